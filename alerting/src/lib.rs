//! keywatch's outward edge: notifiers (Slack, email over SMTP, signed
//! webhooks), the outbox dispatcher, and the HTTP server for the revocation
//! feed, blocklist and metrics. It arrives with the alert-delivery issue;
//! until then alerts are printed by `keywatch replay`.
