//! The `lq-realtime` entry point, built inside this package so that the process tests run it
//! with exactly the dependencies and features of the test build (`bootstrap/src/main.rs` is the
//! same one line).

fn main() -> std::process::ExitCode {
    bootstrap::cli::main()
}
