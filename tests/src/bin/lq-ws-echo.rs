//! The WebSocket transport of lq-realtime in echo mode, for the WebSocket conformance suite:
//! every message comes back as it came, through the transport's own handshake checks, codec,
//! queue and close handling.
//!
//! ```text
//! lq-ws-echo [ADDR]        listen on ADDR (default 127.0.0.1:9001), any path
//! ../shared/tools/autobahn/run-autobahn.sh ws://127.0.0.1:9001 target/autobahn lq-realtime
//! ```

use adapters::inbound::ws::{WsSettings, echo};

/// Room for the suite's largest messages (16 MiB) and a burst of them queued.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
const QUEUE_BYTES: usize = 64 * 1024 * 1024;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let arg = std::env::args().nth(1);
    if matches!(arg.as_deref(), Some("-h" | "--help")) {
        println!(
            "usage: lq-ws-echo [ADDR]   (default 127.0.0.1:9001): the WebSocket transport echoing every message"
        );
        return std::process::ExitCode::SUCCESS;
    }
    let addr = arg.unwrap_or_else(|| "127.0.0.1:9001".to_owned());
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("lq-ws-echo: cannot listen on {addr}: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let local = listener.local_addr().map_or(addr, |a| a.to_string());
    println!("lq-ws-echo listening on ws://{local}");
    let settings = WsSettings {
        max_message_bytes: MAX_MESSAGE_BYTES,
        outbound_queue_bytes: QUEUE_BYTES,
        ..WsSettings::default()
    };
    echo::serve(listener, settings).await;
    std::process::ExitCode::SUCCESS
}
