//! The `meshvpn` command.

fn main() {
    eprintln!("meshvpn: no commands yet");
    std::process::exit(2);
}
