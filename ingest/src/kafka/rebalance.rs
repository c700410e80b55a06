//! The consumer's context: librdkafka's statistics (the broker's high
//! watermarks, for the lag metric) and the rebalance callback, which loads
//! each assigned partition's start from Postgres, positions it, splits its
//! queue off and starts its worker, and drains revoked partitions' workers.

use super::*;

/// The consumer context: does the rebalance work.
pub(super) struct PipelineContext {
    pub(super) shared: Arc<Shared>,
}

impl ClientContext for PipelineContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut offsets = self.shared.metrics.offsets.lock().expect("metrics lock");
        for (topic, t) in &statistics.topics {
            for (p, ps) in &t.partitions {
                if *p < 0 || ps.hi_offset < 0 {
                    continue; // librdkafka's internal UA partition, or not fetched yet
                }
                if let Some(o) = offsets.get_mut(&(topic.clone(), *p)) {
                    o.high_watermark = ps.hi_offset;
                }
            }
        }
    }
}

impl ConsumerContext for PipelineContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr as E;
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            E::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut starts = Vec::new();
                for el in tpl.elements() {
                    let (topic, partition) = (el.topic().to_string(), el.partition());
                    let start = self.shared.load_start(&topic, partition);
                    starts.push((topic, partition, start));
                }
                for (topic, partition, start) in &starts {
                    let checkpoint_at = start.checkpoint.as_ref().map(|c| c.0);
                    let offset = match decide::resume_point(
                        checkpoint_at,
                        start.next_offset,
                        self.shared.kafka.start_from,
                    )
                    .0
                    {
                        Seek::At(o) => Offset::Offset(o),
                        Seek::End => Offset::End,
                    };
                    let _ = tpl.set_partition_offset(topic, *partition, offset);
                }
                // Split each partition's queue off *before* assigning: librdkafka
                // then never forwards its messages to the main queue, so a worker
                // sees its partition's records in order, all of them.
                let Some(arc) = self.shared.consumer.get().and_then(Weak::upgrade) else {
                    return;
                };
                let queues: Vec<_> = starts
                    .iter()
                    .map(|(t, p, _)| arc.split_partition_queue(t, *p))
                    .collect();
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = r {
                    telemetry::rebalance_failed("assign", &e);
                    return;
                }
                let parts: Vec<(String, i32)> =
                    starts.iter().map(|(t, p, _)| (t.clone(), *p)).collect();
                telemetry::rebalanced(self.shared.metrics.stage, "partitions assigned", &parts);
                for ((topic, partition, start), queue) in starts.into_iter().zip(queues) {
                    match queue {
                        Some(q) => self.shared.spawn_worker(q, topic, partition, start),
                        None => Part {
                            topic: &topic,
                            partition,
                        }
                        .no_queue(),
                    }
                }
            }
            E::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let parts: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                telemetry::rebalanced(self.shared.metrics.stage, "partitions revoked", &parts);
                self.shared.stop_workers(&parts);
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = r {
                    telemetry::rebalance_failed("unassign", &e);
                }
            }
            other => {
                telemetry::rebalance_failed("rebalance", &other);
                self.shared.stop_all_workers();
                let _ = consumer.unassign();
            }
        }
    }
}

impl Shared {
    /// Loads where a partition resumes, retrying while Postgres is away,
    /// and decodes its checkpoint (one that does not decode is dropped,
    /// loudly: the state is rebuilt from the partition's start).
    pub(super) fn load_start(&self, topic: &str, partition: i32) -> Start {
        let mut backoff = Duration::from_millis(100);
        let s = loop {
            match self
                .rt
                .block_on(self.store.load_partition(topic, partition))
            {
                Ok(s) => break s,
                Err(e) => {
                    Part { topic, partition }.load_retry(&self.metrics, &e.detail());
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        let checkpoint = s.checkpoint.and_then(|(at, core)| {
            let read = match self.stage {
                Stage::Gateway => EngineState::from_checkpoint(&core, s.entries)
                    .map(|(st, since)| Restored::Gateway(Box::new(st), since))
                    .map_err(|e| e.to_string()),
                Stage::Subjects => serde_json::from_slice::<SubjectState>(&core)
                    .map(|st| Restored::Subjects(Box::new(st)))
                    .map_err(|e| e.to_string()),
            };
            read.map_err(|e| Part { topic, partition }.checkpoint_unreadable(at, &e))
                .ok()
                .map(|r| (at, r))
        });
        // A checkpoint is stored only with the rollups flushed up to it; one
        // past them (which no keywatch writes) could not rebuild the
        // rollups in between, so the state is rebuilt from offset 0.
        let checkpoint = checkpoint.filter(|(at, _)| {
            let behind = s.rollups_offset.is_none_or(|r| *at <= r);
            if !behind {
                let e = format!(
                    "it is past the stored rollups (rollups_offset {:?})",
                    s.rollups_offset
                );
                Part { topic, partition }.checkpoint_unreadable(*at, &e);
            }
            behind
        });
        Start {
            next_offset: s.next_offset,
            rollups_offset: s.rollups_offset,
            checkpoint,
        }
    }

    pub(super) fn spawn_worker(
        self: &Arc<Self>,
        queue: rdkafka::consumer::base_consumer::PartitionQueue<PipelineContext>,
        topic: String,
        partition: i32,
        start: Start,
    ) {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::clone(self);
        let (t, p, s) = (topic.clone(), partition, Arc::clone(&stop));
        self.metrics.offsets.lock().expect("metrics lock").insert(
            (topic.clone(), partition),
            PartitionOffsets {
                high_watermark: -1,
                committed: start.next_offset.unwrap_or(-1),
            },
        );
        let thread = std::thread::Builder::new()
            .name(format!("kw-{topic}-{partition}"))
            .spawn(move || {
                shared.metrics.partitions.fetch_add(1, Ordering::Relaxed);
                let mut w = PartitionWorker::new(&shared, t, p, start, s);
                w.run(queue);
                shared.metrics.partitions.fetch_sub(1, Ordering::Relaxed);
                let key = (w.topic.clone(), w.partition);
                shared
                    .metrics
                    .offsets
                    .lock()
                    .expect("metrics lock")
                    .remove(&key);
            })
            .expect("spawning a partition worker");
        self.workers
            .lock()
            .expect("workers lock")
            .insert((topic, partition), Worker { stop, thread });
    }

    /// Stops every worker (shutdown, or a rebalance error).
    pub(super) fn stop_all_workers(&self) {
        let all: Vec<(String, i32)> = self
            .workers
            .lock()
            .expect("workers lock")
            .keys()
            .cloned()
            .collect();
        self.stop_workers(&all);
    }

    /// Asks workers to finish their batch, commit and stop; waits for them.
    pub(super) fn stop_workers(&self, parts: &[(String, i32)]) {
        let taken: Vec<Worker> = {
            let mut w = self.workers.lock().expect("workers lock");
            parts.iter().filter_map(|k| w.remove(k)).collect()
        };
        for w in &taken {
            w.stop.store(true, Ordering::Release);
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for w in taken {
            while !w.thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if w.thread.is_finished() {
                let _ = w.thread.join();
            } else {
                telemetry::worker_not_drained(DRAIN_TIMEOUT);
            }
        }
    }
}
