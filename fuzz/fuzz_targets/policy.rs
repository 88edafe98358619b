//! The policy parser on any text: never a panic; an error points inside
//! the document; a policy that loads compiles for a small mesh, and its
//! rules only name protocols and prefixes of the right shape.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn_control::policy::{compile, MeshNode, Policy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::parse(text) {
        Err(e) => {
            let lines = text.split('\n').count() as u32;
            assert!(e.pos.line <= lines.max(1), "{e} beyond {lines} lines");
            assert!(!e.message.is_empty());
        }
        Ok(p) => {
            let mesh = [
                MeshNode {
                    name: "a".into(),
                    addresses: vec!["100.64.0.1".parse().unwrap(), "fd7a::1".parse().unwrap()],
                    tags: p.tag_owners.keys().take(1).cloned().collect(),
                    routes: vec!["10.42.1.0/24".parse().unwrap()],
                },
                MeshNode {
                    name: "b".into(),
                    addresses: vec!["100.64.0.2".parse().unwrap()],
                    tags: p.tag_owners.keys().skip(1).cloned().collect(),
                    routes: vec![],
                },
            ];
            for node in &mesh {
                let rules = compile(Some(&p), node, &mesh).expect("a policy compiles");
                // Inbound destinations lie on the node; outbound sources too.
                let on_node = |pfx: &meshvpn_engine::IpPrefix| {
                    node.addresses.iter().any(|a| pfx.contains(*a) && pfx.len() == if a.is_ipv4() { 32 } else { 128 })
                        || node.routes.iter().any(|r| r.len() <= pfx.len() && r.contains(pfx.addr()))
                };
                for r in &rules.inbound {
                    assert!(r.dsts.iter().all(|(d, _)| on_node(d)), "{r:?}");
                }
                for r in &rules.outbound {
                    assert!(r.srcs.iter().all(on_node), "{r:?}");
                }
                for route in &node.routes {
                    let _ = p.auto_approves(node, *route);
                }
            }
        }
    }
});
