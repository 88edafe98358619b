//! The agent's server URL: one rule for the C ABI, Go and `meshvpn tunnel
//! connect`.

use crate::ws::TunnelError;

/// The path k3s mounts the supervisor tunnel on; the default of both roles.
pub const K3S_PATH: &str = "/v1-k3s/connect";

/// `url` with its path replaced by `path`; without `path`, `url` as it is,
/// or with [`K3S_PATH`] when it has no path (`wss://server:6443`).
pub fn url_with_path(url: &str, path: Option<&str>) -> Result<String, TunnelError> {
    let scheme_end = url
        .find("://")
        .ok_or_else(|| TunnelError::Config(format!("url {url:?} has no scheme (wss://...)")))?;
    let authority_start = scheme_end + 3;
    let path_start = url[authority_start..]
        .find('/')
        .map_or(url.len(), |i| authority_start + i);
    let base = &url[..path_start];
    match path {
        Some(p) if !p.starts_with('/') => Err(TunnelError::Config(format!(
            "path {p:?} must start with '/'"
        ))),
        Some(p) => Ok(format!("{base}{p}")),
        None if path_start == url.len() => Ok(format!("{base}{K3S_PATH}")),
        None => Ok(url.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_path_rules() {
        assert_eq!(
            url_with_path("wss://h:6443", None).unwrap(),
            "wss://h:6443/v1-k3s/connect"
        );
        assert_eq!(
            url_with_path("wss://h:6443/x", None).unwrap(),
            "wss://h:6443/x"
        );
        assert_eq!(
            url_with_path("wss://h:6443/x", Some("/y")).unwrap(),
            "wss://h:6443/y"
        );
        assert!(url_with_path("h:6443", None).is_err());
        assert!(url_with_path("wss://h", Some("y")).is_err());
    }
}
