//! A TCP proxy that can silence its connections without closing them: the state a Redis
//! connection can be left in after a failover or a network fault.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub(crate) struct FreezableProxy {
    pub(crate) port: u16,
    next_generation: Arc<AtomicU64>,
    frozen_below: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl FreezableProxy {
    /// Forwards 127.0.0.1:`port` to 127.0.0.1:`upstream`.
    pub(crate) async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let next_generation = Arc::new(AtomicU64::new(0));
        let frozen_below = Arc::new(AtomicU64::new(0));
        let (next, frozen) = (next_generation.clone(), frozen_below.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let generation = next.fetch_add(1, Ordering::SeqCst);
                let frozen = frozen.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = tokio::spawn(pipe(client_read, server_write, generation, frozen.clone()));
                    pipe(server_read, client_write, generation, frozen).await;
                    up.abort();
                });
            }
        });
        Self { port, next_generation, frozen_below, task }
    }

    /// Every connection opened so far stays open but carries nothing more, either way.
    /// Connections opened later work normally.
    pub(crate) fn freeze_existing(&self) {
        self.frozen_below.store(self.next_generation.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    generation: u64,
    frozen_below: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if generation < frozen_below.load(Ordering::SeqCst) {
            // Silenced: hold the connection open, forward nothing.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
