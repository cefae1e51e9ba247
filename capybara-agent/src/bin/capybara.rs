//! `capybara`: the command line for a Capybara agent (see `capybara_agent::cli`).

fn main() -> std::process::ExitCode {
    capybara_agent::cli::main()
}
