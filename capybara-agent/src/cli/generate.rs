//! `capybara generate --out DIR` (hidden): the files `cargo xtask install` installs beside the
//! binaries, generated from the same clap definitions the binaries parse with, so they never
//! drift from the flags:
//!
//! | file under DIR | what |
//! |---|---|
//! | `man/man1/capybara.1`, `man/man1/capybara-<command>[-<sub>].1` | the CLI's man pages, one per command (`man capybara-user-add`) |
//! | `man/man8/capybara-agent.8` | the daemon's man page (section 8: system administration) |
//! | `completions/bash/{capybara,capybara-agent}` | bash-completion files |
//! | `completions/zsh/{_capybara,_capybara-agent}` | zsh `#compdef` functions |
//! | `completions/fish/{capybara,capybara-agent}.fish` | fish completions |
//! | `agent.toml` | the commented default configuration file (`daemon::config_file::sample`) |
//!
//! It lives in the shipped binary (as ripgrep's `--generate` does) rather than in xtask because
//! xtask must build without the agent crate (its `setup` installs what the agent's build needs).

use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use clap_complete::Shell;

use super::{Cli, error::CliError};
use crate::daemon::{args::Args, config_file};

/// Flags of `capybara generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Directory to write into (created; files in it are replaced).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Writes every file of the table above under `args.out`.
pub fn run(args: &GenerateArgs) -> Result<(), CliError> {
    write_all(&args.out).map_err(CliError::file(&args.out))?;
    Ok(())
}

fn write_all(out: &Path) -> std::io::Result<()> {
    let mut cli = Cli::command();
    let mut agent = Args::command();
    let man1 = out.join("man/man1");
    let man8 = out.join("man/man8");
    for dir in [&man1, &man8] {
        std::fs::create_dir_all(dir)?;
    }
    clap_mangen::generate_to(cli.clone(), &man1)?;
    clap_mangen::Man::new(agent.clone())
        .section("8")
        .generate_to(&man8)?;
    for (shell, dir, name) in [
        (Shell::Bash, "bash", "{bin}"),
        (Shell::Zsh, "zsh", "_{bin}"),
        (Shell::Fish, "fish", "{bin}.fish"),
    ] {
        let dir = out.join("completions").join(dir);
        std::fs::create_dir_all(&dir)?;
        for (cmd, bin) in [(&mut cli, "capybara"), (&mut agent, "capybara-agent")] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, cmd, bin, &mut buf);
            std::fs::write(dir.join(name.replace("{bin}", bin)), buf)?;
        }
    }
    std::fs::write(out.join("agent.toml"), config_file::sample())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_man_pages_completions_and_the_sample_config() {
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path()).unwrap();
        let read = |p: &str| {
            std::fs::read_to_string(dir.path().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
        };
        let agent = read("man/man8/capybara-agent.8");
        assert!(agent.starts_with(".ie") || agent.contains(".TH"), "{agent}");
        assert!(agent.contains("listen\\-port"), "{agent}");
        assert!(read("man/man1/capybara.1").contains(".TH capybara 1"));
        assert!(read("man/man1/capybara-user-add.1").contains("capybara\\-user\\-add"));
        assert!(read("completions/bash/capybara").contains("complete"));
        assert!(read("completions/bash/capybara-agent").contains("--listen-port"));
        assert!(read("completions/zsh/_capybara").starts_with("#compdef capybara"));
        assert!(read("completions/fish/capybara-agent.fish").contains("listen-port"));
        assert_eq!(read("agent.toml"), config_file::sample());
    }
}
