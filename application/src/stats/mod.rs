//! Cluster-wide statistics for operators: every instance counts its recent activity
//! ([`activity`]), sends its figures to every instance each second through the broker
//! ([`report`]), and each instance merges the latest figures of all ([`cluster`]), so any of
//! them answers `GET /api/stats` and feeds the dashboard.
//!
//! Memory is bounded whatever the traffic: counts over a sliding minute in fixed slots, the
//! busiest channels by the Space-Saving algorithm, fixed numbers of tenants, channels, failures
//! and samples.

pub mod activity;
pub mod cluster;
pub mod report;

pub use activity::{Activity, CountingBroker, WebhookTarget, WebhookVerdict};
pub use cluster::ClusterView;
pub use report::{ClusterStats, InstanceReport, Sample};
