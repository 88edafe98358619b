//! The `meshvpn` command: a drop-in for wireguard-go (`meshvpn IFNAME`),
//! WireGuard key tools, and one file per further subcommand.
//!
//! Each subcommand is one variant of [`Command`] and one module; the
//! variant's doc comment is its `--help` line. Adding one is three lines
//! here: `mod demo;`, a variant `Demo(demo::DemoArgs)` (a clap `Args`
//! struct in that module), and `Some(Command::Demo(a)) => demo::run(a)`
//! returning [`CliResult`].

mod control;
mod daemon;
mod demo;
mod flannel;
mod forward;
mod keys;
mod metrics;
mod netwatch;
mod persist;
mod status;
mod stun;
mod tunnel;
mod up;

use clap::{ArgAction, Parser, Subcommand};

/// What a subcommand returns; errors are printed as `meshvpn: <error>` and
/// exit with status 1, so they should say what to do next.
pub type CliResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(
    name = "meshvpn",
    version,
    about = "Userspace WireGuard: a drop-in for wireguard-go, and the libmeshvpn tools",
    long_about = "Userspace WireGuard: a drop-in for wireguard-go, and the libmeshvpn tools.\n\n\
        `meshvpn IFNAME` creates the TUN interface IFNAME and its configuration socket \
        /var/run/wireguard/IFNAME.sock, then runs in the background until the interface is \
        deleted or it gets SIGTERM. Configure it with `wg` (wireguard-tools), or let wg-quick \
        start it: WG_QUICK_USERSPACE_IMPLEMENTATION=meshvpn wg-quick up ./wg0.conf",
    args_conflicts_with_subcommands = true,
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    interface: daemon::InterfaceArgs,

    /// More log output on stderr: -v info, -vv debug, -vvv trace. Without
    /// it, LOG_LEVEL=error|verbose|debug|silent is read as wireguard-go does.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Print a new private key in base64 (like `wg genkey`).
    Genkey,
    /// Read a private key on stdin, print its public key (like `wg pubkey`).
    Pubkey,
    /// Print a new preshared key in base64 (like `wg genpsk`).
    Genpsk,
    /// Run a mesh of engines on loopback (no root) and show handshakes, traffic and stats.
    Demo(demo::DemoArgs),
    /// Forward ports through the userspace stack (no root, no TUN).
    Forward(forward::ForwardArgs),
    /// The k3s supervisor tunnel (remotedialer protocol): `serve` or `connect`.
    Tunnel(tunnel::TunnelArgs),
    /// flannel's extension backend commands (k3s --flannel-conf): see docs/k3s.md.
    Flannel(crate::flannel::FlannelArgs),
    /// Per peer: subnet, endpoint, path (udp/relay), last handshake, bytes.
    Status(status::StatusArgs),
    /// STUN (RFC 8489): `probe` asks servers for this host's public address.
    Stun(stun::StunArgs),
    /// The control server, its join keys, nodes, routes and policy: `serve`, `keys create|list|revoke`, `nodes list|remove`, `routes list|approve`, `policy set|get`.
    Control(control::ControlArgs),
    /// Join a mesh run by a control server (`--control URL --join-key-file F`) and stay in it.
    Up(up::UpArgs),
}

/// The log level: `-v` wins, then `LOG_LEVEL`, then `default`; `None` is
/// silent. Logs never carry private or preshared keys: the engine does not
/// log them.
fn log_level(verbose: u8, default: tracing::Level) -> Option<tracing::Level> {
    use tracing::Level;
    match verbose {
        0 => {}
        1 => return Some(Level::INFO),
        2 => return Some(Level::DEBUG),
        _ => return Some(Level::TRACE),
    }
    match std::env::var("LOG_LEVEL").as_deref() {
        Ok("silent") => None,
        Ok("error") => Some(Level::ERROR),
        Ok("warn") => Some(Level::WARN),
        Ok("info") => Some(Level::INFO),
        Ok("verbose" | "debug") => Some(Level::DEBUG),
        Ok("trace") => Some(Level::TRACE),
        _ => Some(default),
    }
}

/// Logs to stderr. `RUST_LOG` (per-module directives such as
/// `meshvpn_engine=debug`) overrides the level when it is set.
fn init_logging(verbose: u8, default: tracing::Level) {
    let filter = match tracing_subscriber::EnvFilter::try_from_env("RUST_LOG") {
        Ok(f) => f,
        Err(_) => match log_level(verbose, default) {
            Some(level) => tracing_subscriber::EnvFilter::new(level.as_str()),
            None => return,
        },
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

/// Raises the soft limit on open files to the hard limit, as the Go runtime
/// does for every Go program: a tunnel endpoint or forwarder holds a socket
/// per stream, and the usual soft limit of 1024 is too low for thousands.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!("open-file limit stays at {soft}: {e}");
            }
        }
    }
}

fn main() {
    let cli = Cli::parse();
    // Long-running services say what they do at info; the rest only warn.
    let default = match cli.command {
        Some(Command::Tunnel(_) | Command::Forward(_) | Command::Up(_)) => tracing::Level::INFO,
        _ => tracing::Level::WARN,
    };
    init_logging(cli.verbose, default);
    raise_open_file_limit();
    let result = match cli.command {
        Some(Command::Genkey) => keys::genkey(),
        Some(Command::Pubkey) => keys::pubkey(),
        Some(Command::Genpsk) => keys::genpsk(),
        Some(Command::Demo(a)) => demo::run(&a).map_err(Into::into),
        Some(Command::Tunnel(a)) => tunnel::run(a).map_err(Into::into),
        Some(Command::Forward(a)) => forward::run(a).map_err(Into::into),
        Some(Command::Flannel(a)) => flannel::run(a),
        Some(Command::Status(a)) => status::run(a),
        Some(Command::Stun(a)) => stun::run(a),
        Some(Command::Control(a)) => control::run(a),
        Some(Command::Up(a)) => up::run(a),
        None => {
            // Keep the daemon's stderr when the user asked for logs, as
            // wireguard-go does with LOG_LEVEL.
            let keep_stdio = cli.verbose > 0 || std::env::var_os("LOG_LEVEL").is_some();
            daemon::run(&cli.interface, keep_stdio)
        }
    };
    if let Err(e) = result {
        eprintln!("meshvpn: {e}");
        std::process::exit(1);
    }
}
