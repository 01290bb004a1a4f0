//! Real PostgreSQL servers for the tests: each initialised in its own directory and listening
//! on its own free port, never the machine's shared one, killed when dropped. Run as the
//! `postgres` user when the tests run as root (PostgreSQL refuses root).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis_support::free_port;

/// The directory of PostgreSQL's server binaries (`initdb`, `postgres`, `pg_isready`): the first
/// directory of the `PATH` that holds them all, else the newest of Debian's
/// `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> PathBuf {
    let complete = |dir: &Path| ["initdb", "postgres", "pg_isready"].iter().all(|b| dir.join(b).is_file());
    if let Ok(path) = std::env::var("PATH")
        && let Some(dir) = std::env::split_paths(&path).find(|dir| complete(dir))
    {
        return dir;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|dir| complete(dir));
    versions.sort_by_key(|dir| {
        dir.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok())
    });
    versions.pop().unwrap_or_else(|| {
        panic!("no PostgreSQL server binaries (initdb, postgres, pg_isready); install them with `apt-get install -y postgresql`")
    })
}

/// `program` with `args`, run as the `postgres` user when this process is root.
fn command(program: &Path, args: &[&str]) -> Command {
    let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        let mut command = Command::new("setpriv");
        command.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]).arg(program).args(args);
        command
    } else {
        let mut command = Command::new(program);
        command.args(args);
        command
    }
}

/// One PostgreSQL server.
pub(crate) struct PostgresServer {
    pub(crate) port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PostgresServer {
    /// A fresh server, initialised and listening, with trust authentication on 127.0.0.1.
    pub(crate) fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("lq-realtime-pg-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let _ = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status();
        let bin = bin_dir();
        let data = dir.join("data");
        let data_text = data.to_str().expect("utf-8 path").to_owned();
        let initialised =
            command(&bin.join("initdb"), &["-D", &data_text, "-U", "postgres", "--auth=trust", "-E", "UTF8"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("initdb runs");
        assert!(initialised.success(), "initdb failed in {}", data.display());
        let mut server = Self { port, dir, child: None };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let data = self.dir.join("data");
        let port = self.port.to_string();
        let socket_dir = self.dir.to_str().expect("utf-8 path").to_owned();
        let child = command(
            &bin_dir().join("postgres"),
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-p",
                &port,
                "-k",
                &socket_dir,
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("postgres starts");
        self.child = Some(child);
        // Listening is not accepting: it answers "starting up" until its recovery is done.
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = self.port.to_string();
        while !Command::new(bin_dir().join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .status()
            .is_ok_and(|status| status.success())
        {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not accept connections on {} within 30 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's URL, for `DATABASE_URL`.
    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server at once (SIGKILL), its data kept.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The postmaster's children go with it; make sure none still holds the port.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Starts the server again on its data and port.
    pub(crate) fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.dir.join("data").join("postmaster.pid"));
        self.spawn();
    }

    /// Runs `sql` and returns the first column of every row, as text.
    pub(crate) async fn query(&self, sql: &str) -> Vec<String> {
        let (client, connection) =
            tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await.expect("connects");
        tokio::spawn(connection);
        let rows = client.simple_query(sql).await.expect("query");
        rows.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
            .collect()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
