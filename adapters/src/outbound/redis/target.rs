//! Where Redis is: one URL, a master found through Sentinel, or a Redis Cluster.

use std::time::Duration;

use deadpool_redis::redis::cluster::{ClusterClient, ClusterClientBuilder};
use deadpool_redis::redis::sentinel::{SentinelClient, SentinelServerType};
use deadpool_redis::redis::{self, aio::PubSub};
use deadpool_redis::{PoolConfig, Runtime, Timeouts};

use super::cluster::routing::{ClusterPools, Op};
use super::shared::{Opener, SharedConnections};
use super::{RedisBrokerSettings, RedisError};

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

impl RedisTarget {
    /// Where Redis is, for the logs and `/ready`: the URL without its user and password, the
    /// sentinels and master name, or the cluster's nodes.
    pub fn location(&self) -> String {
        match self {
            Self::Url(url) => {
                let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
                let rest = rest.split(['?', '#']).next().unwrap_or_default();
                let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
                format!("{scheme}://{host}")
            }
            Self::Sentinel { sentinels, master } => {
                format!("master {master} via sentinels {}", sentinels.join(","))
            }
            Self::Cluster { nodes } => format!("cluster nodes {}", nodes.join(",")),
        }
    }
}

fn sentinel_urls(sentinels: &[String]) -> Vec<String> {
    sentinels.iter().map(|s| format!("redis://{s}")).collect()
}

/// Where commands go.
pub(super) enum PublishPool {
    /// One Redis, or the master Sentinel names: a few shared connections.
    Single(SharedConnections),
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
    pub(super) fn new(settings: &RedisBrokerSettings) -> Result<Self, RedisError> {
        let runtime = Some(Runtime::Tokio1);
        let creation = |error| RedisError::PoolCreation(Box::new(error));
        let shared = |opener| Self::Single(SharedConnections::new(opener, settings.pool_size));
        match &settings.target {
            RedisTarget::Url(url) => {
                redis::Client::open(url.as_str()).map_err(RedisError::InvalidUrl)?;
                let mut config = deadpool_redis::Config::from_url(url.clone());
                config.pool = Some(pool_config(settings));
                config.create_pool(runtime).map(|pool| shared(Opener::Direct(pool))).map_err(creation)
            }
            RedisTarget::Sentinel { sentinels, master } => {
                let mut config = deadpool_redis::sentinel::Config::from_urls(
                    sentinel_urls(sentinels),
                    master.clone(),
                    deadpool_redis::sentinel::SentinelServerType::Master,
                );
                config.pool = Some(pool_config(settings));
                config
                    .create_pool(runtime)
                    .map(|pool| shared(Opener::Sentinel(pool)))
                    .map_err(|error| RedisError::PoolCreation(Box::new(error)))
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

    /// PUBLISH on a pooled connection; errors never carry the URL.
    pub(super) async fn publish(&self, channel: &str, message: &[u8]) -> Result<(), RedisError> {
        let mut command = redis::cmd(self.publish_command());
        command.arg(channel).arg(message);
        self.query(channel, command).await.map(|_| ())
    }

    /// Runs one script (EVALSHA, loading it first when Redis does not know it) on a shared
    /// connection; on a cluster, on the master owning the slot of `route` (its first key).
    pub(super) async fn invoke(
        &self,
        route: &str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<redis::Value, RedisError> {
        match self {
            Self::Single(shared) => shared
                .run(async |connection| invocation.invoke_async(connection).await)
                .await?
                .map_err(RedisError::script),
            Self::Cluster(pools) => Box::pin(pools.run(route, Op::Script(invocation))).await,
        }
    }

    /// Runs one command on a shared connection; on a cluster, on the master owning the slot
    /// of `route` (its key or sharded channel).
    pub(super) async fn query(&self, route: &str, command: redis::Cmd) -> Result<redis::Value, RedisError> {
        match self {
            Self::Single(shared) => shared
                .run(async |connection| command.query_async(connection).await)
                .await?
                .map_err(RedisError::command),
            Self::Cluster(pools) => Box::pin(pools.run(route, Op::Command(&command))).await,
        }
    }

    /// Forgets the shared connections, at most once per `period`: Redis did not answer on
    /// them in time.
    pub(super) fn forget_connections(&self, period: Duration) {
        match self {
            Self::Single(shared) => shared.clear_at_most_every(period),
            Self::Cluster(pools) => pools.forget_connections(period),
        }
    }

    /// Drops every connection, so the next command connects afresh (after a failover, to the
    /// new master).
    pub(super) fn reset(&self) {
        match self {
            Self::Single(shared) => shared.reset(),
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
) -> Result<ClusterClient, RedisError> {
    let urls: Vec<String> = nodes.iter().map(|node| format!("redis://{node}")).collect();
    let mut builder = ClusterClientBuilder::new(urls)
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .use_protocol(redis::ProtocolVersion::RESP3);
    if let Some(pushes) = pushes {
        builder = builder.push_sender(pushes);
    }
    builder.build().map_err(RedisError::InvalidClusterNodes)
}

/// Opens a dedicated Pub/Sub connection to the current master.
pub(super) async fn connect_pubsub(master: &Master<'_>, timeout: Duration) -> Result<PubSub, RedisError> {
    let connect = async {
        let client = match master {
            Master::Url(url) => redis::Client::open(*url).map_err(RedisError::InvalidUrl)?,
            Master::Sentinel { sentinels, master } => {
                let mut sentinel = SentinelClient::build(
                    sentinel_urls(sentinels),
                    (*master).to_owned(),
                    None,
                    SentinelServerType::Master,
                )
                .map_err(RedisError::InvalidUrl)?;
                sentinel.async_get_client().await.map_err(RedisError::NoMasterFromSentinel)?
            }
        };
        client.get_async_pubsub().await.map_err(RedisError::Connection)
    };
    tokio::time::timeout(timeout, connect)
        .await
        .unwrap_or(Err(RedisError::Timeout { what: "no connection", after: timeout }))
}

/// The master a subscriber on one Redis connects to: at a URL, or the one Sentinel names.
pub(super) enum Master<'a> {
    Url(&'a str),
    Sentinel { sentinels: &'a [String], master: &'a str },
}

#[cfg(test)]
mod tests {
    use super::RedisTarget;

    #[test]
    fn a_location_never_shows_a_password() {
        let url = RedisTarget::Url("redis://user:s3cret@redis.internal:6380/2".to_owned());
        assert_eq!(url.location(), "redis://redis.internal:6380/2");
        let no_user = RedisTarget::Url("redis://:p@ss/w@127.0.0.1:6379?password=x#y".to_owned());
        assert_eq!(no_user.location(), "redis://127.0.0.1:6379");
        assert_eq!(
            RedisTarget::Url("redis://127.0.0.1:6379".to_owned()).location(),
            "redis://127.0.0.1:6379"
        );
        let sentinel =
            RedisTarget::Sentinel { sentinels: vec!["a:26379".into(), "b:26379".into()], master: "m".into() };
        assert_eq!(sentinel.location(), "master m via sentinels a:26379,b:26379");
    }
}
