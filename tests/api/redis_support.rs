//! Real `redis-server` processes for the tests: each on its own free port, never the machine's
//! shared instance, killed when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deadpool_redis::redis;

/// A free TCP port on 127.0.0.1.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("lq-realtime-test-{}-{name}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// One `redis-server` (or sentinel) process.
pub(crate) struct RedisServer {
    pub(crate) port: u16,
    args: Vec<String>,
    child: Option<Child>,
    _dir: PathBuf,
}

fn spawn(args: &[String]) -> Child {
    Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}); install it with `apt-get install -y redis-server`")
        })
}

/// Whether a PING on `port` is answered within a short time.
fn answers_ping(port: u16) -> bool {
    let Ok(mut stream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

impl RedisServer {
    /// A plain Redis on a free port.
    pub(crate) fn start() -> Self {
        Self::start_with(&[])
    }

    /// A plain Redis on a free port with extra arguments (e.g. `--replicaof`).
    pub(crate) fn start_with(extra: &[&str]) -> Self {
        let port = free_port();
        let dir = scratch_dir("redis");
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.to_str().expect("utf-8 path"),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut server = Self { port, args, child: None, _dir: dir };
        server.launch();
        server
    }

    /// A Sentinel on a free port monitoring the master on `master_port` as `name`, with a
    /// quorum of one and fast failure detection.
    pub(crate) fn sentinel(name: &str, master_port: u16) -> Self {
        let port = free_port();
        let dir = scratch_dir("sentinel");
        let config = dir.join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nsentinel monitor {name} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {name} 500\nsentinel failover-timeout {name} 3000\n\
                 sentinel parallel-syncs {name} 1\n",
                dir = dir.display()
            ),
        )
        .expect("sentinel.conf");
        let args = vec![config.to_str().expect("utf-8 path").to_owned(), "--sentinel".to_owned()];
        let mut server = Self { port, args, child: None, _dir: dir };
        server.launch();
        server
    }

    fn launch(&mut self) {
        self.child = Some(spawn(&self.args));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !answers_ping(self.port) {
            assert!(Instant::now() < deadline, "redis-server on port {} did not start", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the process (SIGKILL) and waits until the port stops answering.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while answers_ping(self.port) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same port, with the same arguments; returns once it
    /// answers PING.
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// A connection for issuing commands from the test.
    pub(crate) async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connected to the test redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

/// The application channels Redis currently has subscribers for, sorted (the service's own
/// `lq-realtime:` channels, probe and control, left out).
pub(crate) async fn pubsub_channels(connection: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let mut channels: Vec<String> =
        redis::cmd("PUBSUB").arg("CHANNELS").query_async(connection).await.expect("PUBSUB CHANNELS");
    channels.retain(|c| !c.starts_with("lq-realtime:"));
    channels.sort();
    channels
}

/// `redis-cli` with `args` against the server on `port`; its output, trimmed.
pub(crate) fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}); it comes with redis-server"));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A Redis Cluster of three masters, and one replica each when asked, on free ports, with
/// fast failure detection (`cluster-node-timeout 1000`) and without full coverage required; its
/// processes are killed when dropped.
pub(crate) struct RedisCluster {
    pub(crate) nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub(crate) fn start(replicas: bool) -> Self {
        let version = Command::new("redis-server").arg("--version").output().expect("redis-server runs");
        let version = String::from_utf8_lossy(&version.stdout).into_owned();
        let major: u32 = version
            .split("v=")
            .nth(1)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        assert!(major >= 7, "the cluster tests need Redis 7.0 or later (sharded Pub/Sub): {version}");
        let count = if replicas { 6 } else { 3 };
        let nodes: Vec<RedisServer> = (0..count)
            // As docs/operations.md recommends: the other masters keep serving while one fails over.
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-require-full-coverage",
                    "no",
                ])
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        if replicas {
            create.args(["--cluster-replicas", "1"]);
        }
        let output = create.arg("--cluster-yes").output().expect("redis-cli --cluster create runs");
        assert!(output.status.success(), "cluster not created: {}", String::from_utf8_lossy(&output.stdout));
        let cluster = Self { nodes };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cluster.is_settled(replicas) {
            assert!(Instant::now() < deadline, "the cluster did not settle");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// Every node sees the cluster as ok with three masters, and every replica is in sync.
    fn is_settled(&self, replicas: bool) -> bool {
        self.nodes.iter().all(|node| {
            let info = redis_cli(node.port, &["CLUSTER", "INFO"]);
            let replication = redis_cli(node.port, &["INFO", "replication"]);
            info.contains("cluster_state:ok")
                && info.contains(&format!("cluster_known_nodes:{}", self.nodes.len()))
                && info.contains("cluster_size:3")
                && (!replicas
                    || replication.contains("role:master")
                    || replication.contains("master_link_status:up"))
        })
    }

    /// `host:port` of every node, comma-separated, as `REDIS_CLUSTER_NODES` takes them.
    pub(crate) fn seeds(&self) -> String {
        self.nodes.iter().map(|node| format!("127.0.0.1:{}", node.port)).collect::<Vec<_>>().join(",")
    }

    /// The slot of a key or sharded channel, as the cluster computes it.
    pub(crate) fn keyslot(&self, name: &str) -> u16 {
        let node = self.nodes.iter().find(|node| node.child.is_some()).expect("a live node");
        redis_cli(node.port, &["CLUSTER", "KEYSLOT", name]).parse().expect("a slot")
    }

    /// Port of the master serving `slot`, as a live node reports it (`CLUSTER NODES`).
    pub(crate) fn master_of(&self, slot: u16) -> u16 {
        let node = self.nodes.iter().find(|node| node.child.is_some()).expect("a live node");
        let nodes = redis_cli(node.port, &["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let owns = fields[8..].iter().any(|range| {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                match (start.parse::<u16>(), end.parse::<u16>()) {
                    (Ok(start), Ok(end)) => (start..=end).contains(&slot),
                    _ => false,
                }
            });
            if owns {
                let address = fields[1].split('@').next().unwrap_or_default();
                return address.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port");
            }
        }
        panic!("no master for slot {slot} in {nodes}");
    }

    pub(crate) fn node(&mut self, port: u16) -> &mut RedisServer {
        self.nodes.iter_mut().find(|node| node.port == port).expect("a node of the cluster")
    }
}
