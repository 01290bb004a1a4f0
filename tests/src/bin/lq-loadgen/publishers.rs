//! Publishing numbered messages through webhooks, client messages or Redis `PUBLISH` (or
//! `SPUBLISH` on a Redis Cluster).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use adapters::outbound::signatures::sign;
use deadpool_redis::redis;
use tokio::sync::{Mutex, Semaphore, mpsc};

use crate::options::{Load, Options, tenant_name};
use crate::stats::now_micros;

/// What was published to each tenant.
#[derive(Debug, Default)]
pub(crate) struct Published {
    /// Per tenant: messages numbered 0..n were attempted.
    pub(crate) attempted: Vec<u64>,
    /// With `--load topic`, per tenant: the topic of each message number.
    pub(crate) topic_of: Vec<Vec<usize>>,
    /// Per tenant: the numbers whose publish failed (not expected anywhere).
    pub(crate) failed: Vec<Vec<u64>>,
    /// What the first failed publish was answered, when one failed.
    pub(crate) first_failure: Option<String>,
    pub(crate) seconds: f64,
}

impl Published {
    pub(crate) fn ok(&self) -> u64 {
        self.attempted.iter().sum::<u64>() - self.failed.iter().map(|f| f.len() as u64).sum::<u64>()
    }
}

/// Where client messages are sent from: per tenant, the connections' outgoing queues.
pub(crate) type Senders = Vec<Vec<mpsc::Sender<String>>>;

/// `PUBLISH` through a pool on one Redis, or `SPUBLISH` through a cluster connection, which
/// sends each to the master owning the channel's slot.
#[derive(Clone)]
enum RedisPublisher {
    Single(deadpool_redis::Pool),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl RedisPublisher {
    /// From `redis://host:port` or `redis+cluster://host:port,host:port…`.
    async fn new(url: &str) -> Option<Self> {
        if let Some(nodes) = url.strip_prefix("redis+cluster://") {
            let urls: Vec<String> = nodes.split(',').map(|node| format!("redis://{}", node.trim())).collect();
            let client = redis::cluster::ClusterClient::new(urls).ok()?;
            return client.get_async_connection().await.ok().map(Self::Cluster);
        }
        let mut config = deadpool_redis::Config::from_url(url.to_owned());
        config.pool = Some(deadpool_redis::PoolConfig::new(64));
        config.create_pool(Some(deadpool_redis::Runtime::Tokio1)).ok().map(Self::Single)
    }

    async fn publish(&self, channel: &str, message: String) -> bool {
        match self {
            Self::Single(pool) => match pool.get().await {
                Ok(mut connection) => redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(message)
                    .query_async::<i64>(&mut connection)
                    .await
                    .is_ok(),
                Err(_) => false,
            },
            Self::Cluster(connection) => redis::cmd("SPUBLISH")
                .arg(channel)
                .arg(message)
                .query_async::<i64>(&mut connection.clone())
                .await
                .is_ok(),
        }
    }
}

fn body(seq: u64, pad: &str) -> String {
    format!(r#"{{"seq":{seq},"sent":{},"pad":"{pad}"}}"#, now_micros())
}

/// Publishes `options.messages` messages at `options.publish_rate`, tenant after tenant.
pub(crate) async fn publish(options: &Options, senders: &Senders, progress: &AtomicU64) -> Published {
    let tenants = options.tenants;
    let pad = "x".repeat(options.payload_bytes);
    let failed = Arc::new(Mutex::new(vec![Vec::new(); tenants]));
    let first_failure: Arc<std::sync::OnceLock<String>> = Arc::default();
    let mut attempted = vec![0u64; tenants];
    let mut topic_of = vec![Vec::new(); tenants];
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build().unwrap_or_default();
    let redis = match &options.redis {
        Some(url) => RedisPublisher::new(url).await,
        None => None,
    };
    // Bounds the requests in flight; every message is still sent in order of its turn.
    let in_flight = Arc::new(Semaphore::new(512));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..options.messages {
        let due = started + Duration::from_secs_f64(i as f64 / options.publish_rate);
        tokio::time::sleep_until(due.into()).await;
        let tenant = (i % tenants as u64) as usize;
        let seq = attempted[tenant];
        attempted[tenant] += 1;
        progress.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
        let failed = failed.clone();
        match options.load {
            Load::Webhook => {
                let url = format!("{}/webhooks/bench", options.webhook[i as usize % options.webhook.len()]);
                let body = body(seq, &pad);
                let secret = options.webhook_secrets.get(&tenant_name(tenant)).map_or("", String::as_str);
                let signature = sign::sha256_header(secret.as_bytes(), body.as_bytes());
                let request = http
                    .post(url)
                    .header("x-tenant-id", tenant_name(tenant))
                    .header("x-signature", signature)
                    .header("content-type", "application/json")
                    .body(body);
                let first_failure = first_failure.clone();
                tasks.push(tokio::spawn(async move {
                    let refusal = match request.send().await {
                        Ok(response) if response.status().is_success() => None,
                        Ok(response) => {
                            let status = response.status().as_u16();
                            Some(format!("{status} {}", response.text().await.unwrap_or_default()))
                        }
                        Err(error) => Some(format!("the request failed: {error}")),
                    };
                    if let Some(refusal) = refusal {
                        let _ = first_failure.set(refusal);
                        failed.lock().await[tenant].push(seq);
                    }
                    drop(permit);
                }));
            }
            Load::Redis | Load::Topic => {
                let Some(redis) = redis.clone() else { break };
                let channel = if options.load == Load::Topic {
                    let topic = (i / tenants as u64) as usize % options.topics;
                    topic_of[tenant].push(topic);
                    format!("topic:{}:t{topic}", tenant_name(tenant))
                } else {
                    format!("tenant:{}", tenant_name(tenant))
                };
                let timestamp = domain::Timestamp::from_unix_millis(now_micros() / 1000);
                let envelope = format!(
                    r#"{{"type":"bench","payload":{},"timestamp":"{timestamp}","from_user":null,"message_id":"bench-{tenant}-{seq}","channel":"{channel}"}}"#,
                    body(seq, &pad)
                );
                let first_failure = first_failure.clone();
                tasks.push(tokio::spawn(async move {
                    let ok = redis.publish(&channel, envelope).await;
                    if !ok {
                        let _ = first_failure.set(format!("Redis did not take the PUBLISH to {channel}"));
                        failed.lock().await[tenant].push(seq);
                    }
                    drop(permit);
                }));
            }
            Load::Message => {
                let from = &senders[tenant];
                let frame = format!(r#"{{"type":"message","payload":{}}}"#, body(seq, &pad));
                let sent = match from.get(seq as usize % from.len().max(1)) {
                    Some(sender) => sender.send(frame).await.is_ok(),
                    None => false,
                };
                if !sent {
                    let _ = first_failure.set("the sending connection is closed".to_owned());
                    failed.lock().await[tenant].push(seq);
                }
                drop(permit);
            }
            Load::Idle => break,
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let failed = std::mem::take(&mut *failed.lock().await);
    let first_failure = first_failure.get().cloned();
    Published { attempted, topic_of, failed, first_failure, seconds }
}
