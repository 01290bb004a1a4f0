//! `lq-loadgen`: opens authenticated WebSocket connections to lq-realtime instances, drives
//! load through webhooks, client messages or Redis `PUBLISH`, and reports what the clients saw
//! (connections per second, deliveries per second, end-to-end latency, lost and duplicated
//! messages) and what the servers spent (RSS per connection, CPU per delivery). Progress goes
//! to stderr, the report to stdout as one JSON object.
//!
//! # Layout
//! - [`options`]: the command line.
//! - [`clients`]: opening, reading and closing connections.
//! - [`publishers`]: numbered messages through each kind of load.
//! - [`stats`]: per-connection records, percentiles, /proc and /metrics readings.

mod clients;
mod options;
mod publishers;
mod stats;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, watch};

use clients::{Counters, Dialer};
use options::{Load, Options};
use stats::{ProcSample, Received, sample_all};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{}", options::USAGE);
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!("lq-loadgen {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let options = match Options::parse(&args, |key| std::env::var(key).ok()) {
        Ok(options) => options,
        Err(problem) => {
            eprintln!("{problem}\n\nlq-loadgen --help lists the options.");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

/// Prints `line` to stderr every second until `stop` is dropped.
fn progress(line: impl Fn() -> String + Send + 'static) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            eprintln!("{}", line());
        }
    })
}

fn per_sec(count: f64, seconds: f64) -> f64 {
    if seconds > 0.0 { (count / seconds * 10.0).round() / 10.0 } else { 0.0 }
}

async fn metrics_gauges(urls: &[String]) -> Value {
    let http = reqwest::Client::new();
    let mut values = Vec::new();
    for url in urls {
        let page = match http.get(url).timeout(Duration::from_secs(5)).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        values.push(json!({"url": url, "lq_connections": stats::gauge(&page, "lq_connections")}));
    }
    Value::Array(values)
}

fn server_report(pids: &[u32], baseline: ProcSample, loaded: ProcSample, established: usize) -> Value {
    if pids.is_empty() {
        return Value::Null;
    }
    let per_connection = if established > 0 {
        Some(((loaded.rss_kib as f64 - baseline.rss_kib as f64) / established as f64 * 100.0).round() / 100.0)
    } else {
        None
    };
    json!({
        "pids": pids,
        "rss_kib_baseline": baseline.rss_kib,
        "rss_kib_connected": loaded.rss_kib,
        "rss_kib_per_connection": per_connection,
    })
}

async fn run(options: Options) -> Result<Value, String> {
    let dialer = Arc::new(Dialer::new(&options).await?);
    let counters = Arc::new(Counters::default());
    let baseline = sample_all(&options.server_pids);
    if let Some(duration) = options.churn {
        return churn(&options, dialer, counters, duration, baseline).await;
    }

    // Open every connection at the chosen rate.
    let (stop, stopped) = watch::channel(false);
    let mut senders: publishers::Senders = vec![Vec::new(); options.tenants];
    let mut handles = Vec::with_capacity(options.connections);
    let handshakes = Arc::new(Semaphore::new(4096));
    let started = Instant::now();
    let ticker = {
        let (counters, total) = (counters.clone(), options.connections);
        progress(move || {
            format!(
                "connecting: {}/{total} established, {} failed",
                counters.established.load(Ordering::Relaxed),
                counters.failed.load(Ordering::Relaxed)
            )
        })
    };
    let mut opening = Vec::with_capacity(options.connections);
    let mut subscribers = Vec::new();
    for n in 0..options.connections {
        let due = started + Duration::from_secs_f64(n as f64 / options.connect_rate);
        tokio::time::sleep_until(due.into()).await;
        let permit = handshakes.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let tenant = options.tenant(n);
        let (tx, rx) = mpsc::channel(64);
        if options.load == Load::Message {
            senders[tenant].push(tx.clone());
        }
        let topics = options.topics_of(n);
        if !topics.is_empty() {
            subscribers.push((tx, topics.clone()));
        }
        let (dialer, counters, stopped) = (dialer.clone(), counters.clone(), stopped.clone());
        opening.push((
            (tenant, topics),
            tokio::spawn(async move {
                let opened = dialer.open(n, tenant).await;
                drop(permit);
                match opened {
                    Ok(socket) => {
                        counters.established.fetch_add(1, Ordering::Relaxed);
                        counters.open.fetch_add(1, Ordering::Relaxed);
                        Some(tokio::spawn(clients::run(socket, rx, stopped, counters)))
                    }
                    Err(reason) => {
                        counters.fail(reason);
                        None
                    }
                }
            }),
        ));
    }
    for (tenant, task) in opening {
        if let Ok(Some(handle)) = task.await {
            handles.push((tenant, handle));
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    ticker.abort();
    let established = counters.established.load(Ordering::Relaxed);
    eprintln!(
        "connected: {established} in {connect_secs:.1} s, {} failed",
        counters.failed.load(Ordering::Relaxed)
    );

    if !options.hold.is_zero() {
        eprintln!("holding the connections for {:?}", options.hold);
        let ticker = {
            let (counters, started) = (counters.clone(), Instant::now());
            progress(move || {
                format!(
                    "holding: {:.0} s, {} open",
                    started.elapsed().as_secs_f64(),
                    counters.open.load(Ordering::Relaxed)
                )
            })
        };
        tokio::time::sleep(options.hold).await;
        ticker.abort();
    }
    let open_after_hold = counters.open.load(Ordering::Relaxed);
    let connected = sample_all(&options.server_pids);
    let subscriptions = subscribe(&options, subscribers, &counters).await;
    if !subscriptions.is_null() && !options.hold.is_zero() {
        eprintln!("holding the subscriptions for {:?}", options.hold);
        tokio::time::sleep(options.hold).await;
    }
    let subscribed_sample = sample_all(&options.server_pids);

    // Publish, then wait for the deliveries to drain.
    let mut load_report = Value::Null;
    let mut published = publishers::Published::default();
    if options.messages > 0 {
        let before = sample_all(&options.server_pids);
        let sent = Arc::new(AtomicU64::new(0));
        let ticker = {
            let (counters, sent) = (counters.clone(), sent.clone());
            progress(move || {
                format!(
                    "publishing: {} sent, {} delivered",
                    sent.load(Ordering::Relaxed),
                    counters.deliveries.load(Ordering::Relaxed)
                )
            })
        };
        let delivered_before = counters.deliveries.load(Ordering::Relaxed);
        let load_started = Instant::now();
        published = publishers::publish(&options, &senders, &sent).await;
        if published.ok() == 0 {
            ticker.abort();
            let answer = published.first_failure.clone().unwrap_or_else(|| "no answer".to_owned());
            return Err(format!("every message published was refused; the first answer: {answer}"));
        }
        let mut per_tenant = vec![0u64; options.tenants];
        for ((tenant, _), _) in &handles {
            per_tenant[*tenant] += 1;
        }
        let expected: u64 = if options.load == Load::Topic {
            handles
                .iter()
                .map(|((tenant, topics), _)| expected_of(&published, *tenant, topics).count() as u64)
                .sum()
        } else {
            (0..options.tenants)
                .map(|t| (published.attempted[t] - published.failed[t].len() as u64) * per_tenant[t])
                .sum()
        };
        let drain_until = Instant::now() + options.drain;
        while counters.deliveries.load(Ordering::Relaxed) - delivered_before < expected
            && Instant::now() < drain_until
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let load_secs = load_started.elapsed().as_secs_f64();
        ticker.abort();
        let after = sample_all(&options.server_pids);
        let deliveries = counters.deliveries.load(Ordering::Relaxed) - delivered_before;
        let cpu = after.cpu_secs - before.cpu_secs;
        load_report = json!({
            "kind": format!("{:?}", options.load).to_lowercase(),
            "published": published.ok(),
            "publish_failures": published.attempted.iter().sum::<u64>() - published.ok(),
            "publish_seconds": (published.seconds * 1000.0).round() / 1000.0,
            "published_per_sec": per_sec(published.ok() as f64, published.seconds),
            "expected_deliveries": expected,
            "deliveries": deliveries,
            "deliveries_per_sec": per_sec(deliveries as f64, load_secs),
            "server_cpu_seconds": if options.server_pids.is_empty() { Value::Null } else { json!((cpu * 1000.0).round() / 1000.0) },
            "server_cpu_us_per_delivery": if options.server_pids.is_empty() || deliveries == 0 { Value::Null } else { json!((cpu * 1e6 / deliveries as f64 * 100.0).round() / 100.0) },
        });
    }

    // Close everything and account for every message.
    let _ = stop.send(true);
    let mut received: Vec<((usize, Vec<usize>), Received)> = Vec::with_capacity(handles.len());
    for (of, handle) in handles {
        if let Ok(r) = handle.await {
            received.push((of, r));
        }
    }
    let (mut lost, mut duplicated) = (0u64, 0u64);
    let mut latencies = Vec::new();
    for ((tenant, topics), r) in &mut received {
        duplicated += r.duplicated;
        if options.load == Load::Topic {
            lost += expected_of(&published, *tenant, topics).filter(|seq| !r.has(*seq)).count() as u64;
        } else if let Some(failed) = published.failed.get(*tenant) {
            lost += (0..published.attempted[*tenant])
                .filter(|seq| !failed.contains(seq) && !r.has(*seq))
                .count() as u64;
        }
        latencies.append(&mut r.latencies);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let closed = sample_all(&options.server_pids);
    let mut server = server_report(&options.server_pids, baseline, connected, established);
    if let Value::Object(map) = &mut server {
        map.insert("rss_kib_after_close".into(), json!(closed.rss_kib));
        let made = subscriptions["subscribed"].as_u64().unwrap_or(0);
        if made > 0 {
            map.insert("rss_kib_subscribed".into(), json!(subscribed_sample.rss_kib));
            let per = (subscribed_sample.rss_kib as f64 - connected.rss_kib as f64) * 1024.0 / made as f64;
            map.insert("rss_bytes_per_subscription".into(), json!(per.round()));
        }
    }
    Ok(json!({
        "connections": {
            "requested": options.connections,
            "established": established,
            "failed": counters.failed.load(Ordering::Relaxed),
            "failures": counters.failures(),
            "seconds": (connect_secs * 1000.0).round() / 1000.0,
            "per_sec": per_sec(established as f64, connect_secs),
            "open_after_hold": open_after_hold,
            "hold_seconds": options.hold.as_secs_f64(),
            "dropped_by_server": counters.dropped.load(Ordering::Relaxed),
        },
        "subscriptions": subscriptions,
        "load": load_report,
        "latency_ms": stats::percentiles_ms(&mut latencies),
        "lost": lost,
        "duplicated": duplicated,
        "server": server,
        "metrics": metrics_gauges(&options.metrics).await,
    }))
}

/// The message numbers of `tenant` published to one of `topics` and accepted.
fn expected_of<'a>(
    published: &'a publishers::Published,
    tenant: usize,
    topics: &'a [usize],
) -> impl Iterator<Item = u64> + 'a {
    let failed = published.failed.get(tenant);
    published.topic_of.get(tenant).into_iter().flat_map(move |of| {
        of.iter()
            .enumerate()
            .filter(move |(seq, topic)| {
                topics.contains(topic) && !failed.is_some_and(|f| f.contains(&(*seq as u64)))
            })
            .map(|(seq, _)| seq as u64)
    })
}

/// Has every connection subscribe to its topics, each handed its frames through its outgoing
/// queue, and waits until every `subscribed` (or refusal) arrived; reports how long it took.
async fn subscribe(
    options: &Options,
    subscribers: Vec<(mpsc::Sender<String>, Vec<usize>)>,
    counters: &Counters,
) -> Value {
    if subscribers.is_empty() {
        return Value::Null;
    }
    let wanted: usize = subscribers.iter().map(|(_, topics)| topics.len()).sum();
    let ticker = { progress(move || format!("subscribing: {wanted} subscriptions asked")) };
    let started = Instant::now();
    for (sender, topics) in &subscribers {
        for topic in topics {
            let _ = sender.send(format!(r#"{{"type":"subscribe","channel":"t{topic}"}}"#)).await;
        }
    }
    let deadline = started + options.drain.max(Duration::from_secs(30));
    while counters.subscribed.load(Ordering::Relaxed) + counters.refused.load(Ordering::Relaxed) < wanted
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    ticker.abort();
    let subscribed = counters.subscribed.load(Ordering::Relaxed);
    eprintln!("subscribed: {subscribed} of {wanted} in {seconds:.1} s");
    json!({
        "asked": wanted,
        "subscribed": subscribed,
        "refused": counters.refused.load(Ordering::Relaxed),
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "per_sec": per_sec(subscribed as f64, seconds),
    })
}

/// Opens connections at `--connect-rate` for `duration`, each closed right after its welcome;
/// reports whether the servers return to their baseline.
async fn churn(
    options: &Options,
    dialer: Arc<Dialer>,
    counters: Arc<Counters>,
    duration: Duration,
    baseline: ProcSample,
) -> Result<Value, String> {
    let started = Instant::now();
    let in_flight = Arc::new(Semaphore::new(4096));
    let ticker = {
        let counters = counters.clone();
        progress(move || {
            format!(
                "churning: {} connected and closed, {} failed",
                counters.established.load(Ordering::Relaxed),
                counters.failed.load(Ordering::Relaxed)
            )
        })
    };
    let mut peak = baseline;
    let mut n = 0usize;
    let mut tasks = Vec::new();
    while started.elapsed() < duration {
        let due = started + Duration::from_secs_f64(n as f64 / options.connect_rate);
        tokio::time::sleep_until(due.into()).await;
        let permit = in_flight.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let (dialer, counters) = (dialer.clone(), counters.clone());
        let tenant = options.tenant(n);
        // Connection numbers wrap so users repeat, as real clients reconnect.
        let id = n % options.connections;
        tasks.push(tokio::spawn(async move {
            match dialer.open(id, tenant).await {
                Ok(mut socket) => {
                    counters.established.fetch_add(1, Ordering::Relaxed);
                    let _ = socket.close(None).await;
                    while let Some(Ok(_)) = futures_util::StreamExt::next(&mut socket).await {}
                }
                Err(reason) => counters.fail(reason),
            }
            drop(permit);
        }));
        n += 1;
        if n.is_multiple_of(1000) {
            let now = sample_all(&options.server_pids);
            peak.rss_kib = peak.rss_kib.max(now.rss_kib);
            tasks.retain(|t| !t.is_finished());
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    let seconds = started.elapsed().as_secs_f64();
    ticker.abort();
    // Let the servers notice the last closes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = sample_all(&options.server_pids);
    let established = counters.established.load(Ordering::Relaxed);
    let server = if options.server_pids.is_empty() {
        Value::Null
    } else {
        json!({
            "pids": options.server_pids,
            "rss_kib_baseline": baseline.rss_kib,
            "rss_kib_peak": peak.rss_kib,
            "rss_kib_end": end.rss_kib,
            "rss_change_percent": ((end.rss_kib as f64 / baseline.rss_kib.max(1) as f64 - 1.0) * 1000.0).round() / 10.0,
        })
    };
    Ok(json!({
        "churn": {
            "seconds": (seconds * 10.0).round() / 10.0,
            "connected_and_closed": established,
            "per_sec": per_sec(established as f64, seconds),
            "failed": counters.failed.load(Ordering::Relaxed),
            "failures": counters.failures(),
        },
        "server": server,
        "metrics": metrics_gauges(&options.metrics).await,
    }))
}
