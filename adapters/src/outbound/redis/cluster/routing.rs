//! Commands on a Redis Cluster: shared connections to each master (see `shared`), created by a
//! `deadpool-redis` pool per master, each command sent to the master that owns the hash slot of
//! its key or sharded channel.
//!
//! The topology (which master owns which slots) comes from `CLUSTER SLOTS`, asked of any master
//! or seed that answers. A `MOVED` answer sends the command again to the named node and
//! refreshes the topology; an `ASK` answer sends it once to the named node after `ASKING`. A
//! master that cannot be reached refreshes the topology: when its slots moved (a replica was
//! promoted) the command goes to the new owner, otherwise it fails at once. A failing master
//! never delays commands for the others: each has its own connections, and nothing waits on a shared
//! lock while a node is down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use deadpool_redis::redis::{self, ErrorKind, ScriptInvocation, ServerErrorKind, Value};
use deadpool_redis::{Pool, PoolConfig, Runtime};
use tokio::time::Instant;

use super::super::RedisError;
use super::super::shared::{Opener, SharedConnections};

/// Number of hash slots of a Redis Cluster.
const SLOTS: u16 = 16_384;
/// Commands are redirected or retried at most this many times.
const ATTEMPTS: usize = 4;
/// A refresh asked for within this time of the last one reuses its answer.
const REFRESH_COOLDOWN: Duration = Duration::from_millis(100);

/// The hash slot of a key or sharded channel name (CRC16/XMODEM of its hash tag, or of the
/// whole name when it has none, modulo 16384).
pub(in crate::outbound::redis) fn slot(name: &[u8]) -> u16 {
    let tagged = name
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &name[open + 1..];
            rest.iter().position(|b| *b == b'}').filter(|close| *close > 0).map(|close| &rest[..close])
        })
        .unwrap_or(name);
    crc16(tagged) % SLOTS
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in bytes {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 == 0 { crc << 1 } else { (crc << 1) ^ 0x1021 };
        }
    }
    crc
}

/// The masters of the cluster and the slot ranges each owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(in crate::outbound::redis) struct Topology {
    /// `host:port` → inclusive slot ranges.
    pub(in crate::outbound::redis) masters: HashMap<String, Vec<(u16, u16)>>,
}

impl Topology {
    /// From a `CLUSTER SLOTS` reply given by the node at `asked` (whose host stands in for
    /// an empty one).
    pub(in crate::outbound::redis) fn parse(reply: &Value, asked: &str) -> Option<Self> {
        let Value::Array(ranges) = reply else { return None };
        let asked_host = asked.rsplit_once(':').map_or(asked, |(host, _)| host);
        let mut masters: HashMap<String, Vec<(u16, u16)>> = HashMap::new();
        for range in ranges {
            let Value::Array(fields) = range else { return None };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return None;
            };
            let host = match master.first()? {
                Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok()?,
                Value::SimpleString(text) => text.clone(),
                _ => return None,
            };
            let host = if host.is_empty() || host == "?" { asked_host.to_owned() } else { host };
            let Value::Int(port) = master.get(1)? else { return None };
            let range = (u16::try_from(*start).ok()?, u16::try_from(*end).ok()?);
            masters.entry(format!("{host}:{port}")).or_default().push(range);
        }
        Some(Self { masters })
    }

    /// The master owning `slot`, if any.
    pub(in crate::outbound::redis) fn owner(&self, slot: u16) -> Option<&str> {
        self.masters
            .iter()
            .find(|(_, ranges)| ranges.iter().any(|(start, end)| (*start..=*end).contains(&slot)))
            .map(|(node, _)| node.as_str())
    }
}

/// A command or a script.
#[derive(Clone, Copy)]
pub(in crate::outbound::redis) enum Op<'a> {
    Command(&'a redis::Cmd),
    Script(&'a ScriptInvocation<'a>),
}

impl Op<'_> {
    async fn send(
        self,
        connection: &mut impl redis::aio::ConnectionLike,
        asking: bool,
    ) -> redis::RedisResult<Value> {
        if asking {
            redis::cmd("ASKING").query_async::<Value>(connection).await?;
        }
        match self {
            Self::Command(command) => command.query_async(connection).await,
            Self::Script(invocation) => invocation.invoke_async(connection).await,
        }
    }

    /// The failure of this operation, as Redis answered it.
    fn failure(self, error: redis::RedisError) -> RedisError {
        match self {
            Self::Command(_) => RedisError::command(error),
            Self::Script(_) => RedisError::script(error),
        }
    }
}

/// One master's pool and the connections shared by its commands.
#[derive(Clone)]
struct Master {
    pool: Pool,
    shared: Arc<SharedConnections>,
}

/// The connections of the masters, and the topology that routes to them.
pub(in crate::outbound::redis) struct ClusterPools {
    seeds: Vec<String>,
    config: PoolConfig,
    timeout: Duration,
    topology: RwLock<Arc<Topology>>,
    pools: Mutex<HashMap<String, Master>>,
    /// When the topology was last refreshed; held while one refresh runs.
    refreshed: tokio::sync::Mutex<Option<Instant>>,
}

impl ClusterPools {
    pub(in crate::outbound::redis) fn new(seeds: Vec<String>, config: PoolConfig, timeout: Duration) -> Self {
        Self {
            seeds,
            config,
            timeout,
            topology: RwLock::new(Arc::new(Topology::default())),
            pools: Mutex::new(HashMap::new()),
            refreshed: tokio::sync::Mutex::new(None),
        }
    }

    pub(in crate::outbound::redis) fn topology(&self) -> Arc<Topology> {
        self.topology.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn master(&self, node: &str) -> Result<Master, RedisError> {
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(master) = pools.get(node) {
            return Ok(master.clone());
        }
        let mut config = deadpool_redis::Config::from_url(format!("redis://{node}"));
        config.pool = Some(self.config);
        let pool = config
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|error| RedisError::PoolCreation(Box::new(error)).at(node))?;
        let shared = Arc::new(SharedConnections::new(Opener::Direct(pool.clone()), self.config.max_size));
        let master = Master { pool, shared };
        pools.insert(node.to_owned(), master.clone());
        Ok(master)
    }

    /// Forgets every master's shared connections, at most once per `period` each.
    pub(in crate::outbound::redis) fn forget_connections(&self, period: Duration) {
        let masters: Vec<Master> =
            self.pools.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        for master in masters {
            master.shared.clear_at_most_every(period);
        }
    }

    /// Asks the masters, then the seeds, for the topology; the first answer wins.
    pub(in crate::outbound::redis) async fn refresh(&self) -> Result<Arc<Topology>, RedisError> {
        let mut refreshed = self.refreshed.lock().await;
        if refreshed.is_some_and(|at| at.elapsed() < REFRESH_COOLDOWN) {
            return Ok(self.topology());
        }
        let mut candidates: Vec<String> = self.topology().masters.keys().cloned().collect();
        for seed in &self.seeds {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
            }
        }
        let mut last_error = RedisError::NoClusterNode;
        for node in candidates {
            match self.ask_topology(&node).await {
                Ok(topology) => {
                    let topology = Arc::new(topology);
                    *self.topology.write().unwrap_or_else(PoisonError::into_inner) = topology.clone();
                    self.pools
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .retain(|node, _| topology.masters.contains_key(node));
                    *refreshed = Some(Instant::now());
                    return Ok(topology);
                }
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    async fn ask_topology(&self, node: &str) -> Result<Topology, RedisError> {
        let ask = async {
            let mut connection = self.master(node)?.pool.get().await?;
            let reply: Value = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async(&mut connection)
                .await
                .map_err(RedisError::command)?;
            let topology =
                Topology::parse(&reply, node).ok_or(RedisError::UnexpectedReply("CLUSTER SLOTS"))?;
            if topology.masters.is_empty() {
                return Err(RedisError::NoSlotServed);
            }
            Ok(topology)
        };
        let after = self.timeout;
        tokio::time::timeout(after, ask)
            .await
            .unwrap_or(Err(RedisError::Timeout { what: "no answer", after }))
            .map_err(|error| error.at(node))
    }

    /// Runs `op` on the master owning the slot of `route` (a key or a sharded channel).
    pub(in crate::outbound::redis) async fn run(&self, route: &str, op: Op<'_>) -> Result<Value, RedisError> {
        let slot = slot(route.as_bytes());
        let mut redirect: Option<String> = None;
        let mut asking = false;
        for _ in 0..ATTEMPTS {
            let node = match redirect.take() {
                Some(node) => node,
                None => match self.topology().owner(slot) {
                    Some(node) => node.to_owned(),
                    None => match self.refresh().await?.owner(slot) {
                        Some(node) => node.to_owned(),
                        None => return Err(RedisError::SlotUnowned(slot)),
                    },
                },
            };
            let master = self.master(&node)?;
            let sent = if std::mem::take(&mut asking) {
                // `ASKING` holds for the next command of its connection only: one not shared.
                match master.pool.get().await {
                    Ok(mut connection) => Ok(op.send(&mut connection, true).await),
                    Err(error) => Err(RedisError::from(error)),
                }
            } else {
                master.shared.run(async |connection| op.send(connection, false).await).await
            };
            let error = match sent {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error)) => error,
                Err(error) => {
                    if self.moved_away(slot, &node).await {
                        continue;
                    }
                    return Err(error.at(&node));
                }
            };
            match error.kind() {
                ErrorKind::Server(kind @ (ServerErrorKind::Moved | ServerErrorKind::Ask)) => {
                    let Some(to) = redirect_node(&error, &node) else {
                        return Err(RedisError::RedirectionWithoutNode(error).at(&node));
                    };
                    redirect = Some(to);
                    if kind == ServerErrorKind::Ask {
                        asking = true;
                    } else {
                        // The next commands go to the new owner without a redirection.
                        let _ = self.refresh().await;
                    }
                }
                _ if error.is_io_error() || error.is_unrecoverable_error() => {
                    if !self.moved_away(slot, &node).await {
                        return Err(op.failure(error).at(&node));
                    }
                }
                _ => return Err(op.failure(error).at(&node)),
            }
        }
        Err(RedisError::TooManyRedirections { slot, attempts: ATTEMPTS })
    }

    /// Whether `slot` has another owner than `node` once the topology is refreshed.
    async fn moved_away(&self, slot: u16, node: &str) -> bool {
        match self.refresh().await {
            Ok(topology) => topology.owner(slot).is_some_and(|owner| owner != node),
            Err(_) => false,
        }
    }
}

/// The node a `MOVED` or `ASK` answer of `asked` names, as `host:port` (an unknown host, sent as
/// `:port`, is `asked`'s).
fn redirect_node(error: &redis::RedisError, asked: &str) -> Option<String> {
    let (address, _slot) = error.redirect_node()?;
    Some(match address.strip_prefix(':') {
        Some(port) => format!("{}:{port}", asked.rsplit_once(':').map_or(asked, |(host, _)| host)),
        None => address.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_cluster_specification() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot(b"foo"), 12_182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"{tenant:acme}"), slot(b"tenant:acme"));
        assert_eq!(slot(b"lq-realtime:{tenant:acme}:history"), slot(b"tenant:acme"));
        // An empty tag hashes the whole name.
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
    }

    #[test]
    fn the_topology_is_read_from_cluster_slots() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.into()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(10922), node("10.0.0.2", 7001)]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node("", 7002)]),
        ]);
        let topology = Topology::parse(&reply, "10.0.0.3:7002").expect("valid");
        assert_eq!(topology.masters.len(), 3);
        assert_eq!(topology.owner(0), Some("10.0.0.1:7000"));
        assert_eq!(topology.owner(5461), Some("10.0.0.2:7001"));
        assert_eq!(topology.owner(16_383), Some("10.0.0.3:7002"), "an empty host is the node asked");
        assert_eq!(Topology::parse(&Value::Nil, "x:1"), None);
    }
}
