//! `agora completions bash|zsh|fish` (also elvish, powershell): the shell completion script,
//! generated from the same clap definitions the binary parses with.

use std::process::ExitCode;

use clap::{Args, CommandFactory};
use clap_complete::Shell;

#[derive(Args)]
pub struct CompletionsCommand {
    /// The shell: bash (`source <(agora completions bash)`), zsh (a file `_agora` on the
    /// fpath) or fish (`agora completions fish > ~/.config/fish/completions/agora.fish`).
    #[arg(value_enum)]
    shell: Shell,
}

impl CompletionsCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        let mut cmd = crate::Cli::command();
        clap_complete::generate(self.shell, &mut cmd, "agora", &mut std::io::stdout());
        Ok(ExitCode::SUCCESS)
    }
}
