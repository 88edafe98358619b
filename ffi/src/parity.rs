//! The stats parity test: every field the engine declares (with
//! `stats_struct!` / `stats_reasons!`, see `meshvpn_engine::stats`) is in
//! the C header and the Go binding under its name there, and neither has a
//! field the engine lacks. The Rust → C conversions in this crate
//! destructure exhaustively, so a Rust-only field does not compile; this
//! test catches the two places the compiler does not see: a stale
//! `include/meshvpn.h` and `bindings/go`.

use std::path::Path;

use ::meshvpn_engine::peer::{DropReason, PeerStats};
use ::meshvpn_engine::relay::{RelayServerStats, RelayStatus};
use ::meshvpn_engine::stats::StatField;
use ::meshvpn_engine::supervisor::{AgentStats, ServerStats};
use ::meshvpn_engine::wg::{EngineStats, NatStats};

/// A field whose C or Go name is not the Rust one. `c` empty: the Rust
/// name; ending in `()`: not a struct field but a function of its own.
/// `go` empty: the C name in Go's CamelCase (compared without case and
/// underscores, so `rx_invalid_mac` is `RxInvalidMAC`).
struct Rename {
    rust: &'static str,
    c: &'static str,
    go: &'static str,
}

/// One engine stats struct and the names it has in C and Go.
struct Exported {
    rust: &'static str,
    fields: &'static [StatField],
    c: &'static str,
    go: &'static str,
    renames: &'static [Rename],
}

const EXPORTED: &[Exported] = &[
    Exported {
        rust: "EngineStats",
        fields: EngineStats::FIELDS,
        c: "meshvpn_stats",
        go: "Stats",
        renames: &[],
    },
    Exported {
        rust: "NatStats",
        fields: NatStats::FIELDS,
        c: "meshvpn_nat_stats",
        go: "NATStats",
        renames: &[],
    },
    Exported {
        rust: "PeerStats",
        fields: PeerStats::FIELDS,
        c: "meshvpn_peer_stats",
        go: "PeerStats",
        renames: &[
            // The path is a bool in C and Go: relay or not.
            Rename {
                rust: "path",
                c: "on_relay",
                go: "",
            },
            Rename {
                rust: "last_handshake",
                c: "last_handshake_unix_ms",
                go: "LastHandshake",
            },
            Rename {
                rust: "handshake_rtt_ms",
                c: "",
                go: "HandshakeRTT",
            },
        ],
    },
    Exported {
        rust: "RelayStatus",
        fields: RelayStatus::FIELDS,
        c: "meshvpn_relay_status",
        go: "RelayStatus",
        renames: &[Rename {
            rust: "last_error",
            c: "meshvpn_engine_relay_last_error()",
            go: "",
        }],
    },
    Exported {
        rust: "RelayServerStats",
        fields: RelayServerStats::FIELDS,
        c: "meshvpn_relay_server_stats",
        go: "RelayServerStats",
        renames: &[],
    },
    Exported {
        rust: "ServerStats",
        fields: ServerStats::FIELDS,
        c: "meshvpn_tunnel_server_stats",
        go: "TunnelServerStats",
        renames: &[],
    },
    Exported {
        rust: "AgentStats",
        fields: AgentStats::FIELDS,
        c: "meshvpn_tunnel_agent_status",
        go: "TunnelAgentStatus",
        renames: &[],
    },
];

/// Lower case without underscores: how a C name and its Go CamelCase
/// (initialisms included) compare.
fn fold(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// `/* */` and `//` comments removed.
fn strip_c_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("/*") {
        out.push_str(&rest[..i]);
        rest = rest[i..].find("*/").map_or("", |j| &rest[i + j + 2..]);
    }
    out.push_str(rest);
    out.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text between `open` and the `close` that follows it.
fn block<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let len = text[start..].find(close)?;
    Some(&text[start..start + len])
}

/// Field names of `typedef struct NAME { ... } NAME;` in the header.
fn c_struct_fields(header: &str, name: &str) -> Option<Vec<String>> {
    let body = block(
        header,
        &format!("typedef struct {name} {{"),
        &format!("}} {name};"),
    )?;
    Some(
        body.split(';')
            .map(|decl| decl.split('[').next().unwrap_or("").trim())
            .filter(|decl| !decl.is_empty())
            .filter_map(|decl| decl.split_whitespace().last())
            .map(str::to_owned)
            .collect(),
    )
}

/// `NAME = VALUE` entries of `enum NAME { ... }` in the header.
fn c_enum_values(header: &str, name: &str) -> Option<Vec<(String, u64)>> {
    let after = &header[header.find(&format!("enum {name}\n"))?..];
    let body = block(after, "{", "}")?;
    Some(
        body.split(',')
            .filter_map(|e| {
                let (n, v) = e.split_once('=')?;
                Some((n.trim().to_owned(), v.trim().parse().ok()?))
            })
            .collect(),
    )
}

/// Field names of `type NAME struct { ... }` in the Go source (several
/// names on one line, `A, B uint64`, included).
fn go_struct_fields(go: &str, name: &str) -> Option<Vec<String>> {
    let body = block(go, &format!("\ntype {name} struct {{\n"), "\n}\n")?;
    let mut fields = Vec::new();
    for line in body.lines() {
        let line = line.split("//").next().unwrap_or("").trim();
        let Some((names, _ty)) = line.rsplit_once(char::is_whitespace) else {
            continue;
        };
        fields.extend(
            names
                .split(',')
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty()),
        );
    }
    Some(fields)
}

/// Compares one struct's fields; problems are pushed to `errors`.
fn check_struct(e: &Exported, header: &str, go: &str, errors: &mut Vec<String>) {
    let rename = |f: &StatField| e.renames.iter().find(|r| r.rust == f.name);
    for f in e.fields {
        if f.doc.trim().is_empty() {
            errors.push(format!("Rust {}.{} has no doc", e.rust, f.name));
        }
    }
    for r in e.renames {
        if !e.fields.iter().any(|f| f.name == r.rust) {
            errors.push(format!(
                "rename of {}.{}: no such Rust field",
                e.rust, r.rust
            ));
        }
    }

    // C: the struct's fields, plus those read by a function of their own.
    let expected_c: Vec<(&str, &str)> = e
        .fields
        .iter()
        .map(|f| {
            let c = rename(f).map(|r| r.c).filter(|c| !c.is_empty());
            (f.name, c.unwrap_or(f.name))
        })
        .collect();
    match c_struct_fields(header, e.c) {
        None => errors.push(format!("C: struct {} not in include/meshvpn.h", e.c)),
        Some(got) => {
            for (rust, c) in &expected_c {
                if let Some(function) = c.strip_suffix("()") {
                    if !header.contains(&format!(" {function}(")) {
                        errors.push(format!("C: {}.{rust}: no function {function}", e.rust));
                    }
                } else if !got.iter().any(|g| g == c) {
                    errors.push(format!("C: {} lacks `{c}` (Rust {}.{rust})", e.c, e.rust));
                }
            }
            for g in &got {
                if !expected_c.iter().any(|(_, c)| c == g) {
                    errors.push(format!("C: {} has `{g}`, which {} lacks", e.c, e.rust));
                }
            }
        }
    }

    // Go: compared by folded name.
    let expected_go: Vec<(&str, String)> = expected_c
        .iter()
        .zip(e.fields)
        .map(|((rust, c), f)| {
            let go = rename(f).map(|r| r.go).filter(|g| !g.is_empty());
            let c = c.strip_suffix("()").map_or(*c, |_| *rust);
            (*rust, fold(go.unwrap_or(c)))
        })
        .collect();
    match go_struct_fields(go, e.go) {
        None => errors.push(format!("Go: type {} struct not in bindings/go", e.go)),
        Some(got) => {
            for (rust, want) in &expected_go {
                if !got.iter().any(|g| fold(g) == *want) {
                    errors.push(format!("Go: {} lacks a field for {}.{rust}", e.go, e.rust));
                }
            }
            for g in &got {
                if !expected_go.iter().any(|(_, w)| fold(g) == *w) {
                    errors.push(format!("Go: {} has `{g}`, which {} lacks", e.go, e.rust));
                }
            }
        }
    }
}

/// Compares the drop reasons: C enum values and Go constants and names.
fn check_drop_reasons(header: &str, go: &str, errors: &mut Vec<String>) {
    let c_name = |name: &str| format!("MESHVPN_DROP_{}", name.to_uppercase());
    match c_enum_values(header, "meshvpn_drop_reason") {
        None => errors.push("C: enum meshvpn_drop_reason not in include/meshvpn.h".into()),
        Some(got) => {
            for (i, r) in DropReason::ALL.iter().enumerate() {
                let want = c_name(r.name());
                match got.iter().find(|(n, _)| *n == want) {
                    None => errors.push(format!("C: meshvpn_drop_reason lacks {want}")),
                    Some((_, v)) if *v != i as u64 => {
                        errors.push(format!("C: {want} = {v}, Rust has index {i}"))
                    }
                    Some(_) => {}
                }
            }
            for (n, _) in &got {
                if !DropReason::ALL.iter().any(|r| c_name(r.name()) == *n) {
                    errors.push(format!(
                        "C: meshvpn_drop_reason has {n}, which DropReason lacks"
                    ));
                }
            }
        }
    }

    // Go: `DropX DropReason = C.MESHVPN_DROP_X` and `DropX: "x",` in
    // dropReasonNames.
    let mut consts = Vec::new();
    let mut names = Vec::new();
    for line in go.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [name, "DropReason", "=", value, ..] = words[..] {
            consts.push((name.to_owned(), value.trim_start_matches("C.").to_owned()));
        }
        if let [key, text, ..] = words[..] {
            if let (Some(key), Some(text)) = (
                key.strip_suffix(':'),
                text.strip_suffix(',')
                    .and_then(|t| t.strip_prefix('"')?.strip_suffix('"')),
            ) {
                if key.starts_with("Drop") {
                    names.push((key.to_owned(), text.to_owned()));
                }
            }
        }
    }
    for r in DropReason::ALL {
        let want = c_name(r.name());
        let Some((constant, _)) = consts.iter().find(|(_, v)| *v == want) else {
            errors.push(format!("Go: no DropReason constant = C.{want}"));
            continue;
        };
        if fold(constant) != fold(&format!("drop_{}", r.name())) {
            errors.push(format!(
                "Go: {constant} = C.{want}; the name should be Drop + {}",
                r.name()
            ));
        }
        match names.iter().find(|(k, _)| k == constant) {
            None => errors.push(format!("Go: dropReasonNames has no {constant}")),
            Some((_, text)) if text != r.name() => errors.push(format!(
                "Go: {constant} is named {text:?}, Rust says {:?}",
                r.name()
            )),
            Some(_) => {}
        }
    }
    for (constant, value) in &consts {
        if !DropReason::ALL.iter().any(|r| c_name(r.name()) == *value) {
            errors.push(format!(
                "Go: {constant} = C.{value}, which DropReason lacks"
            ));
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every stats field of the engine is in `include/meshvpn.h` and in
/// `bindings/go` under its name there, and no field is extra in either.
#[test]
fn stats_parity_rust_c_go() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let header = strip_c_comments(&read(&root.join("include/meshvpn.h")));
    let mut go = String::new();
    let mut files: Vec<_> = std::fs::read_dir(root.join("bindings/go"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.ends_with(".go") && !name.ends_with("_test.go")
        })
        .collect();
    files.sort();
    for f in files {
        go.push('\n');
        go.push_str(&read(&f));
    }

    let mut errors = Vec::new();
    for e in EXPORTED {
        check_struct(e, &header, &go, &mut errors);
    }
    check_drop_reasons(&header, &go, &mut errors);
    assert!(
        errors.is_empty(),
        "stats differ between Rust, C (include/meshvpn.h) and Go (bindings/go):\n  {}",
        errors.join("\n  ")
    );
}

/// The parsers see what they must, so a pass means something.
#[test]
fn parsers_read_c_and_go_declarations() {
    let header = strip_c_comments(
        "typedef struct s {\n  /**\n   * doc; with semicolon\n   */\n  uint64_t a;\n  \
         char b[N];\n  struct meshvpn_key k;\n} s;\nenum r\n {\n  R_A = 0,\n  /** x */\n  R_B = 1,\n};\n",
    );
    assert_eq!(c_struct_fields(&header, "s").unwrap(), ["a", "b", "k"]);
    assert_eq!(
        c_enum_values(&header, "r").unwrap(),
        [("R_A".to_owned(), 0), ("R_B".to_owned(), 1)]
    );
    let go = "\ntype S struct {\n\tA uint64 // a\n\t// doc\n\tB, C uint64\n\tD [N]uint64\n}\n";
    assert_eq!(go_struct_fields(go, "S").unwrap(), ["A", "B", "C", "D"]);
    assert_eq!(fold("RxInvalidMAC"), fold("rx_invalid_mac"));
}
