//! `lq-realtime`: see `docs/` and `lq-realtime --help`.

/// jemalloc, with its background thread returning freed memory to the system within seconds.
/// A burst of connections (a reconnection storm after an instance stops) holds thousands of
/// handshakes at once, each with its HTTP buffers and its Redis reads; glibc's allocator kept
/// that memory after the burst (about 13 KiB more per connection, measured with
/// `BROKER=redis tests/bench/idle.sh`), jemalloc gives it back. See docs/benchmarks.md.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    bootstrap::cli::main()
}
