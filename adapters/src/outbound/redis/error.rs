//! `RedisError`: why the Redis adapter could not start, why an operation failed, or why a
//! subscriber session ended. At the ports it becomes `BrokerError::Unavailable`, so no redis
//! type crosses into `application`.

use std::time::Duration;

use application::ports::BrokerError;
use deadpool_redis::redis;

use crate::outbound::system::RandomnessError;

/// What went wrong with Redis, by what a caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The Redis URL cannot be used.
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(#[source] redis::RedisError),
    /// The Redis Cluster's node addresses cannot be used.
    #[error("invalid Redis Cluster nodes: {0}")]
    InvalidClusterNodes(#[source] redis::RedisError),
    /// A connection pool could not be created from its settings.
    #[error("cannot create a Redis pool: {0}")]
    PoolCreation(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No random instance id: the operating system gave no randomness.
    #[error(transparent)]
    Randomness(#[from] RandomnessError),
    /// No pooled connection: the pool could not connect, or every connection stayed busy.
    #[error("no Redis connection: {0}")]
    NoConnection(#[from] deadpool_redis::PoolError),
    /// A connection could not be opened, or broke (refused, reset, closed).
    #[error("Redis connection failed: {0}")]
    Connection(#[source] redis::RedisError),
    /// Sentinel named no reachable master.
    #[error("no master from Sentinel: {0}")]
    NoMasterFromSentinel(#[source] redis::RedisError),
    /// Redis answered a command with an error.
    #[error("Redis command failed: {0}")]
    Command(#[source] redis::RedisError),
    /// Redis answered a script with an error (the script failed on the way, or could not load).
    #[error("Redis script failed: {0}")]
    Script(#[source] redis::RedisError),
    /// A subscription command failed; the subscriptions are sent again.
    #[error("{command} failed: {source}")]
    Subscription { command: &'static str, source: redis::RedisError },
    /// Redis did not confirm a subscription command within the time allowed.
    #[error("{command} not confirmed within {after:?}")]
    NotConfirmed { command: &'static str, after: Duration },
    /// Redis did not answer, or did not confirm, within the time allowed.
    #[error("{what} within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    /// Redis answered with something this version does not understand.
    #[error("unexpected answer from Redis to {0}")]
    UnexpectedReply(&'static str),
    /// A message to keep in a channel's history is not a JSON object.
    #[error("a message with a history must be a JSON object")]
    NotAnObject,
    /// The subscriber connection closed.
    #[error("connection closed")]
    ConnectionClosed,
    /// Probes Redis accepted stopped coming back through the subscriber: it is deaf.
    #[error("probe messages stopped arriving")]
    ProbesLost,
    /// The same, for the probes of one master of a Redis Cluster.
    #[error("probe messages of {node} stopped arriving")]
    MasterProbesLost { node: String },
    /// No node of the Redis Cluster answered with its topology.
    #[error("no Redis Cluster node to ask")]
    NoClusterNode,
    /// The Redis Cluster says that no master owns any slot.
    #[error("no master owns a slot")]
    NoSlotServed,
    /// No master of the Redis Cluster owns the slot of the key or channel.
    #[error("no Redis Cluster master owns slot {0}")]
    SlotUnowned(u16),
    /// A `MOVED` or `ASK` answer that names no node to go to.
    #[error("redirected to no node: {0}")]
    RedirectionWithoutNode(#[source] redis::RedisError),
    /// A command whose slot still moved (redirected, or its master gone) after every attempt.
    #[error("slot {slot} still moving after {attempts} attempts")]
    TooManyRedirections { slot: u16, attempts: usize },
    /// A failure at one node of the Redis Cluster.
    #[error("{node}: {source}")]
    AtNode { node: String, source: Box<RedisError> },
}

impl RedisError {
    /// A failed command: the connection's failure, or Redis's refusal.
    pub(super) fn command(error: redis::RedisError) -> Self {
        if is_connection(&error) { Self::Connection(error) } else { Self::Command(error) }
    }

    /// A failed script: the connection's failure, or the script's.
    pub(super) fn script(error: redis::RedisError) -> Self {
        if is_connection(&error) { Self::Connection(error) } else { Self::Script(error) }
    }

    /// The same failure, at `node` of a Redis Cluster.
    pub(super) fn at(self, node: &str) -> Self {
        Self::AtNode { node: node.to_owned(), source: Box::new(self) }
    }
}

fn is_connection(error: &redis::RedisError) -> bool {
    error.is_io_error() || error.is_connection_refusal() || error.is_connection_dropped()
}

/// The ports know one failure of the broker: unavailable, try again later.
impl From<RedisError> for BrokerError {
    fn from(error: RedisError) -> Self {
        Self::Unavailable(error.to_string())
    }
}
