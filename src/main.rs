//! `agora`: one binary for the whole cluster — master, agent, developer cluster, and the
//! client commands. Each subcommand lives in `src/commands/<name>.rs`.
//!
//! Exit codes: 0 success; 1 an error (printed as one line on stderr); 2 bad usage;
//! `agora run` passes the task's exit code through (128+N for signal N), exits 125 when the
//! task never ran, 134 for a Wasm trap or limit, 130/143 when interrupted (README).

use std::process::ExitCode;

use clap::Parser;

mod cluster;
mod commands;
mod ha_dev;
mod output;

/// mimalloc rather than glibc's malloc: the control plane makes many small, short-lived
/// allocations on several threads (ids, statuses, frames); under callgrind glibc's malloc and
/// free were a third of all instructions of a Wasm launch burst, and swapping the allocator
/// alone raised no-op Wasm throughput by about a third (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Agora: a resource-offer cluster manager.
#[derive(Parser)]
#[command(name = "agora", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// Log format for diagnostics on stderr.
    #[arg(long, global = true, value_enum, default_value_t = commands::LogFormat::Text)]
    log_format: commands::LogFormat,
    #[command(subcommand)]
    command: commands::Command,
}

/// A client command whose reader went away (`agora tasks -o json | head -c 10`) ends as other
/// Unix tools do, killed by SIGPIPE without a word, rather than panicking in `println!` on
/// EPIPE (Rust ignores SIGPIPE by default). Servers, the demo and executors keep ignoring it:
/// a closed socket to an executor must not kill the agent, nor the agent's an executor.
fn die_quietly_on_sigpipe() {
    // SAFETY: restores the default disposition of one signal before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.command.dies_on_closed_pipe() {
        die_quietly_on_sigpipe();
    }
    commands::init_logging(&cli.command, cli.log_format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.command.worker_threads() {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agora: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli.command.execute()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agora: {e:#}");
            ExitCode::from(1)
        }
    }
}
