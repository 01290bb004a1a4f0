//! `lq-realtime`: see `docs/` and `lq-realtime --help`.

fn main() -> std::process::ExitCode {
    bootstrap::cli::main()
}
