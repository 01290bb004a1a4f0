//! Where Redis is: one URL, a master found through Sentinel, or a Redis Cluster.

use std::time::Duration;

use deadpool_redis::redis::cluster::{ClusterClient, ClusterClientBuilder};
use deadpool_redis::redis::sentinel::{SentinelClient, SentinelServerType};
use deadpool_redis::redis::{self, aio::PubSub};
use deadpool_redis::{PoolConfig, Runtime, Timeouts};

use super::RedisBrokerSettings;
use super::cluster::routing::{ClusterPools, Op};

/// How to reach Redis.
#[derive(Clone)]
pub enum RedisTarget {
    /// `redis://…` or `rediss://…`.
    Url(String),
    /// The master named `master`, as the sentinels at `sentinels` (`host:port`) report it.
    Sentinel { sentinels: Vec<String>, master: String },
    /// A Redis Cluster reached first through any of `nodes` (`host:port`); channels use
    /// sharded Pub/Sub (`SPUBLISH`/`SSUBSCRIBE`).
    Cluster { nodes: Vec<String> },
}

impl std::fmt::Debug for RedisTarget {
    // URLs may carry passwords.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Url(_) => f.write_str("RedisTarget::Url(<redacted>)"),
            Self::Sentinel { sentinels, master } => f
                .debug_struct("RedisTarget::Sentinel")
                .field("sentinels", sentinels)
                .field("master", master)
                .finish(),
            Self::Cluster { nodes } => f.debug_struct("RedisTarget::Cluster").field("nodes", nodes).finish(),
        }
    }
}

/// Why the Redis settings are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TargetError(pub String);

fn sentinel_urls(sentinels: &[String]) -> Vec<String> {
    sentinels.iter().map(|s| format!("redis://{s}")).collect()
}

/// The pool PUBLISH goes through.
pub(super) enum PublishPool {
    Direct(deadpool_redis::Pool),
    Sentinel(deadpool_redis::sentinel::Pool),
    /// A pool per master, each command routed by the slot of its key or channel.
    Cluster(Box<ClusterPools>),
}

fn pool_config(settings: &RedisBrokerSettings) -> PoolConfig {
    let timeout = Some(settings.op_timeout);
    let mut config = PoolConfig::new(settings.pool_size.max(1));
    config.timeouts = Timeouts { wait: timeout, create: timeout, recycle: timeout };
    config
}

impl PublishPool {
    pub(super) fn new(settings: &RedisBrokerSettings) -> Result<Self, TargetError> {
        let runtime = Some(Runtime::Tokio1);
        match &settings.target {
            RedisTarget::Url(url) => {
                redis::Client::open(url.as_str())
                    .map_err(|e| TargetError(format!("invalid Redis URL: {e}")))?;
                let mut config = deadpool_redis::Config::from_url(url.clone());
                config.pool = Some(pool_config(settings));
                config.create_pool(runtime).map(Self::Direct).map_err(|e| TargetError(e.to_string()))
            }
            RedisTarget::Sentinel { sentinels, master } => {
                let mut config = deadpool_redis::sentinel::Config::from_urls(
                    sentinel_urls(sentinels),
                    master.clone(),
                    deadpool_redis::sentinel::SentinelServerType::Master,
                );
                config.pool = Some(pool_config(settings));
                config.create_pool(runtime).map(Self::Sentinel).map_err(|e| TargetError(e.to_string()))
            }
            RedisTarget::Cluster { nodes } => {
                cluster_client(nodes, settings.op_timeout, None)?;
                Ok(Self::Cluster(Box::new(ClusterPools::new(
                    nodes.clone(),
                    pool_config(settings),
                    settings.op_timeout,
                ))))
            }
        }
    }

    /// The command that publishes: `SPUBLISH` (sharded Pub/Sub) on a cluster, `PUBLISH`
    /// otherwise.
    pub(super) fn publish_command(&self) -> &'static str {
        if matches!(self, Self::Cluster(_)) { "SPUBLISH" } else { "PUBLISH" }
    }

    /// The cluster's pools, when the target is a cluster.
    pub(super) fn cluster(&self) -> Option<&ClusterPools> {
        match self {
            Self::Cluster(pools) => Some(pools),
            _ => None,
        }
    }

    /// PUBLISH on a pooled connection; errors are described, never carrying the URL.
    pub(super) async fn publish(&self, channel: &str, message: &[u8]) -> Result<(), String> {
        let mut command = redis::cmd(self.publish_command());
        command.arg(channel).arg(message);
        self.query(channel, command).await.map(|_| ())
    }

    /// Runs one script (EVALSHA, loading it first when Redis does not know it) on a pooled
    /// connection; on a cluster, on the master owning the slot of `route` (its first key).
    pub(super) async fn invoke(
        &self,
        route: &str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<redis::Value, String> {
        let result = match self {
            Self::Direct(pool) => match pool.get().await {
                Ok(mut connection) => invocation.invoke_async(&mut connection).await,
                Err(error) => return Err(format!("no Redis connection: {error}")),
            },
            Self::Sentinel(pool) => match pool.get().await {
                Ok(mut connection) => invocation.invoke_async(&mut connection).await,
                Err(error) => return Err(format!("no Redis connection: {error}")),
            },
            Self::Cluster(pools) => {
                return pools
                    .run(route, Op::Script(invocation))
                    .await
                    .map_err(|e| format!("Redis script failed: {e}"));
            }
        };
        result.map_err(|e| format!("Redis script failed: {e}"))
    }

    /// Runs one command on a pooled connection; on a cluster, on the master owning the slot of
    /// `route` (its key or sharded channel).
    pub(super) async fn query(&self, route: &str, command: redis::Cmd) -> Result<redis::Value, String> {
        let result = match self {
            Self::Direct(pool) => match pool.get().await {
                Ok(mut connection) => command.query_async(&mut connection).await,
                Err(error) => return Err(format!("no Redis connection: {error}")),
            },
            Self::Sentinel(pool) => match pool.get().await {
                Ok(mut connection) => command.query_async(&mut connection).await,
                Err(error) => return Err(format!("no Redis connection: {error}")),
            },
            Self::Cluster(pools) => {
                return pools
                    .run(route, Op::Command(&command))
                    .await
                    .map_err(|e| format!("Redis command failed: {e}"));
            }
        };
        result.map_err(|e| format!("Redis command failed: {e}"))
    }

    /// Drops every idle pooled connection, so the next publish connects afresh (after a
    /// failover, to the new master).
    pub(super) fn reset(&self) {
        match self {
            Self::Direct(pool) => {
                pool.retain(|_, _| false);
            }
            Self::Sentinel(pool) => {
                pool.retain(|_, _| false);
            }
            // Each master's pool is dropped once a topology refresh no longer lists it.
            Self::Cluster(_) => {}
        }
    }
}

/// A cluster client on `nodes` (`host:port`); with `pushes`, over RESP3 with every push
/// (sharded messages, subscription changes, disconnections) sent there.
pub(super) fn cluster_client(
    nodes: &[String],
    timeout: Duration,
    pushes: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
) -> Result<ClusterClient, TargetError> {
    let urls: Vec<String> = nodes.iter().map(|node| format!("redis://{node}")).collect();
    let mut builder = ClusterClientBuilder::new(urls)
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .use_protocol(redis::ProtocolVersion::RESP3);
    if let Some(pushes) = pushes {
        builder = builder.push_sender(pushes);
    }
    builder.build().map_err(|e| TargetError(format!("invalid Redis Cluster nodes: {e}")))
}

/// Opens a dedicated Pub/Sub connection to the current master.
pub(super) async fn connect_pubsub(target: &RedisTarget, timeout: Duration) -> Result<PubSub, String> {
    let connect = async {
        let client = match target {
            RedisTarget::Url(url) => redis::Client::open(url.as_str()).map_err(|e| e.to_string())?,
            RedisTarget::Cluster { .. } => {
                return Err("a cluster has no single Pub/Sub connection".to_owned());
            }
            RedisTarget::Sentinel { sentinels, master } => {
                let mut sentinel = SentinelClient::build(
                    sentinel_urls(sentinels),
                    master.clone(),
                    None,
                    SentinelServerType::Master,
                )
                .map_err(|e| e.to_string())?;
                sentinel.async_get_client().await.map_err(|e| format!("no master from Sentinel: {e}"))?
            }
        };
        client.get_async_pubsub().await.map_err(|e| e.to_string())
    };
    tokio::time::timeout(timeout, connect).await.map_err(|_| format!("no connection within {timeout:?}"))?
}
