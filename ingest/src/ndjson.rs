//! Reading NDJSON fast: lines out of large buffered reads, with no copy
//! unless a line straddles two reads, in time linear in the input however
//! the reads are cut, and in memory bounded by [`MAX_LINE_BYTES`].

use std::io::{self, Read};

/// Size of each read.
const CHUNK: usize = 1 << 20;

/// The longest line kept: longer ones are skipped (their bytes are read and
/// dropped, never held) and reported as [`Line::TooLong`]. A canonical record
/// is well under a kilobyte; this leaves room for raw prompts of a million
/// tokens and more.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// One line of the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// The line's bytes, without `\n` or a trailing `\r`.
    Text(&'a [u8]),
    /// A line longer than the limit: how many bytes it had (a trailing
    /// `\r` included).
    TooLong(u64),
}

/// Yields the lines of a reader with their 1-based line numbers.
pub struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Start of unread data in `buf`.
    pos: usize,
    /// End of valid data in `buf`.
    end: usize,
    /// `buf[pos..scanned]` holds no newline (so it is not searched again).
    scanned: usize,
    /// Bytes dropped so far of a line over the limit.
    skipping: Option<u64>,
    max: usize,
    eof: bool,
    line_no: u64,
    /// Bytes searched for a newline, each up to the first one found (a
    /// test checks it stays linear).
    searched: u64,
}

impl<R: Read> LineReader<R> {
    /// A reader over `inner`.
    pub fn new(inner: R) -> Self {
        Self::with_limit(inner, MAX_LINE_BYTES)
    }

    /// A reader whose longest line is `max` bytes.
    pub fn with_limit(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            buf: vec![0; CHUNK.min(max.max(1).next_power_of_two())],
            pos: 0,
            end: 0,
            scanned: 0,
            skipping: None,
            max,
            eof: false,
            line_no: 0,
            searched: 0,
        }
    }

    /// The next line and its number, or `None` at the end.
    pub fn next_line(&mut self) -> io::Result<Option<(u64, Line<'_>)>> {
        loop {
            if let Some(dropped) = self.skipping {
                let found = memchr::memchr(b'\n', &self.buf[self.pos..self.end]);
                self.searched += found.map_or(self.end - self.pos, |nl| nl + 1) as u64;
                let upto = found.map_or(self.end, |nl| self.pos + nl);
                let dropped = dropped + (upto - self.pos) as u64;
                if found.is_some() || (self.eof && dropped > 0) {
                    self.pos = (upto + 1).min(self.end);
                    self.scanned = self.pos;
                    self.skipping = None;
                    self.line_no += 1;
                    return Ok(Some((self.line_no, Line::TooLong(dropped))));
                }
                self.skipping = Some(dropped);
                if self.eof {
                    return Ok(None);
                }
                (self.pos, self.end, self.scanned) = (0, 0, 0);
                self.fill()?;
                continue;
            }
            let from = self.scanned.max(self.pos);
            let found = memchr::memchr(b'\n', &self.buf[from..self.end]);
            // The bytes memchr looked at: up to the newline it stopped at.
            self.searched += found.map_or(self.end - from, |nl| nl + 1) as u64;
            if let Some(nl) = found {
                let start = self.pos;
                let stop = from + nl;
                self.pos = stop + 1;
                self.scanned = self.pos;
                self.line_no += 1;
                let line = trim_cr(&self.buf[start..stop]);
                if line.len() > self.max {
                    return Ok(Some((self.line_no, Line::TooLong((stop - start) as u64))));
                }
                return Ok(Some((self.line_no, Line::Text(line))));
            }
            self.scanned = self.end;
            if self.eof {
                if self.pos < self.end {
                    let start = self.pos;
                    self.pos = self.end;
                    self.line_no += 1;
                    let line = trim_cr(&self.buf[start..self.end]);
                    if line.len() > self.max {
                        let raw = (self.end - start) as u64;
                        return Ok(Some((self.line_no, Line::TooLong(raw))));
                    }
                    return Ok(Some((self.line_no, Line::Text(line))));
                }
                return Ok(None);
            }
            if self.end - self.pos > self.max + 1 {
                // Longer than any line kept (a `\r` may end it): drop it as it comes.
                self.skipping = Some((self.end - self.pos) as u64);
                self.pos = self.end;
                continue;
            }
            if self.pos > 0 {
                // Move the partial line to the front (once per read that ends a
                // line, so each byte moves a bounded number of times).
                self.buf.copy_within(self.pos..self.end, 0);
                self.end -= self.pos;
                self.scanned -= self.pos;
                self.pos = 0;
            }
            if self.end == self.buf.len() {
                let grown = (self.buf.len() * 2).min(self.max + 2 + CHUNK);
                self.buf.resize(grown, 0);
            }
            self.fill()?;
        }
    }

    /// Reads once into the free end of the buffer.
    fn fill(&mut self) -> io::Result<()> {
        let n = loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            self.eof = true;
        }
        self.end += n;
        Ok(())
    }
}

/// The lines of an in-memory (or memory-mapped) NDJSON text, with their
/// 1-based numbers; the same lines [`LineReader`] yields (the caller judges
/// their length: the text is in memory already).
pub fn lines(text: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let mut pos = 0usize;
    let mut line_no = 0u64;
    std::iter::from_fn(move || {
        if pos >= text.len() {
            return None;
        }
        let end = memchr::memchr(b'\n', &text[pos..]).map_or(text.len(), |n| pos + n);
        let line = trim_cr(&text[pos..end]);
        pos = end + 1;
        line_no += 1;
        Some((line_no, line))
    })
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A reader that hands out at most `.1` bytes of `.0` per read, as a pipe
/// does (`.2` counts the reads).
#[doc(hidden)]
pub struct Trickle<'a>(pub &'a [u8], pub usize, pub usize);

impl Read for Trickle<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.2 += 1;
        let n = self.1.min(out.len()).min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

/// The checks the fuzzer (`fuzz/fuzz_targets/ndjson.rs`) and the test
/// suite run on one input: the first two bytes pick the bytes per read
/// (1-64) and the line limit (1-64), the rest is the text. Whatever the
/// bytes and however the reads are cut, the reader yields what splitting
/// the whole text gives, lines over the limit reported by their length;
/// it searches each byte a bounded number of times and holds at most the
/// limit and one read.
#[doc(hidden)]
pub fn fuzz_one(data: &[u8]) {
    let (per_read, max, text) = match data {
        [a, b, rest @ ..] => (usize::from(a % 64) + 1, usize::from(b % 64) + 1, rest),
        _ => (1, 1, data),
    };
    let want = lines(text).map(|(n, l)| {
        let raw = text
            .split(|&b| b == b'\n')
            .nth(n as usize - 1)
            .unwrap_or_default();
        (
            n,
            if l.len() > max {
                Err(raw.len() as u64)
            } else {
                Ok(l)
            },
        )
    });
    let mut r = LineReader::with_limit(Trickle(text, per_read, 0), max);
    let mut want = want.fuse();
    loop {
        assert!(
            r.buf.len() <= max + 2 + CHUNK,
            "a buffer of {} bytes",
            r.buf.len()
        );
        let got = r.next_line().expect("reading a slice cannot fail");
        match (got, want.next()) {
            (None, None) => break,
            (Some((n, Line::Text(l))), Some((m, Ok(w)))) => assert!(n == m && l == w, "line {n}"),
            (Some((n, Line::TooLong(len))), Some((m, Err(w)))) => {
                assert!(n == m && len == w, "line {n}")
            }
            (got, want) => panic!("read {got:?}, the whole text gives {want:?}"),
        }
    }
    assert!(
        r.searched <= 2 * text.len() as u64 + 2,
        "{} bytes searched of {}",
        r.searched,
        text.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::Just;

    fn owned(l: Line<'_>) -> Result<Vec<u8>, u64> {
        match l {
            Line::Text(t) => Ok(t.to_vec()),
            Line::TooLong(n) => Err(n),
        }
    }

    fn read_all<R: Read>(mut r: LineReader<R>) -> Vec<(u64, Result<Vec<u8>, u64>)> {
        let mut out = vec![];
        while let Some((n, l)) = r.next_line().unwrap() {
            out.push((n, owned(l)));
        }
        out
    }

    fn lines(input: &[u8]) -> Vec<(u64, Result<Vec<u8>, u64>)> {
        read_all(LineReader::new(input))
    }

    #[test]
    fn splits_lines_keeps_numbers_and_handles_crlf_and_no_final_newline() {
        assert_eq!(
            lines(b"a\r\nbb\n\nccc"),
            vec![
                (1, Ok(b"a".to_vec())),
                (2, Ok(b"bb".to_vec())),
                (3, Ok(b"".to_vec())),
                (4, Ok(b"ccc".to_vec()))
            ]
        );
        assert!(lines(b"").is_empty());
    }

    #[test]
    fn in_memory_lines_match_the_reader() {
        for input in [&b"a\r\nbb\n\nccc"[..], b"", b"x\n", b"\n\n"] {
            let mem: Vec<_> = super::lines(input)
                .map(|(n, l)| (n, Ok(l.to_vec())))
                .collect();
            assert_eq!(mem, lines(input), "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn lines_longer_than_a_chunk_and_straddling_reads() {
        let long = vec![b'x'; CHUNK * 2 + 17];
        let mut input = b"first\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nlast\n");
        let got = lines(&input);
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].1.as_ref().unwrap().len(), long.len());
        assert_eq!(got[2], (3, Ok(b"last".to_vec())));
        // The same through a pipe's small reads.
        assert_eq!(read_all(LineReader::new(Trickle(&input, 4096, 0))), got);
    }

    #[test]
    fn a_line_over_the_limit_is_skipped_and_reported_in_bounded_memory() {
        for (max, per_read) in [(10, 3), (10, 1000), (16, 7)] {
            let mut input = b"ok\n".to_vec();
            input.extend_from_slice(&[b'y'; 50]);
            input.extend_from_slice(b"\r\nexact_10_b\nzzzzzzzzzzz\nend");
            let mut r = LineReader::with_limit(Trickle(&input, per_read, 0), max);
            let mut got = vec![];
            while let Some((n, l)) = r.next_line().unwrap() {
                got.push((n, owned(l)));
                assert!(r.buf.len() <= max + 2 + CHUNK);
            }
            let eleven = if max >= 11 {
                Ok(b"zzzzzzzzzzz".to_vec())
            } else {
                Err(11)
            };
            assert_eq!(
                got,
                vec![
                    (1, Ok(b"ok".to_vec())),
                    (2, Err(51)),
                    (3, Ok(b"exact_10_b".to_vec())),
                    (4, eleven),
                    (5, Ok(b"end".to_vec())),
                ],
                "max {max}, {per_read} bytes per read"
            );
        }
        // An over-long last line without a newline.
        let input = [b'q'; 40];
        let got = read_all(LineReader::with_limit(Trickle(&input, 8, 0), 10));
        assert_eq!(got, vec![(1, Err(40))]);
    }

    #[test]
    fn a_long_line_in_small_reads_is_read_in_linear_time() {
        // 8 MiB in 1 KiB reads: a reader that searched the whole partial
        // line on every read would search 32 GiB; count the bytes searched
        // instead of timing anything.
        let mut input = vec![b'a'; 8 << 20];
        input.push(b'\n');
        let mut r = LineReader::new(Trickle(&input, 1024, 0));
        let (n, l) = r.next_line().unwrap().unwrap();
        assert_eq!((n, owned(l).unwrap().len()), (1, 8 << 20));
        assert!(r.next_line().unwrap().is_none());
        assert!(
            r.searched <= 2 * input.len() as u64,
            "{} bytes searched",
            r.searched
        );
    }

    proptest::proptest! {
        /// The fuzz target's checks, on text rich in line ends, in every test run.
        #[test]
        fn any_input_in_any_reads_matches_the_whole_text(
            text in proptest::collection::vec(
                proptest::prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'x'), proptest::num::u8::ANY],
                0..400,
            ),
            per_read in 0u8..64,
            max in 0u8..40,
        ) {
            let mut data = vec![per_read, max];
            data.extend_from_slice(&text);
            fuzz_one(&data);
        }
    }
}
