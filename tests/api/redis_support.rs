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
