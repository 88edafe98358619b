//! TLS settings for both roles: rustls with the ring provider only.
//!
//! There is no "insecure" mode: an agent always verifies the server against
//! the CA it was given, and a server that accepts client certificates
//! verifies them against its client CA before a certificate can name a client.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::TunnelError;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every `CERTIFICATE` block of a PEM text.
pub fn certificates_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TunnelError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TunnelError::Config(format!("bad certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TunnelError::Config("no certificate in PEM".into()));
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM text.
pub fn private_key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TunnelError> {
    // The error text of the parser never includes key material.
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| TunnelError::Config(format!("bad private key PEM: {e}")))
}

fn root_store(ca_pem: &[u8]) -> Result<RootCertStore, TunnelError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates_from_pem(ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| TunnelError::Config(format!("bad CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// An agent's TLS settings: trust exactly `ca_pem`; present `identity`
/// (certificate chain PEM, private key PEM) when given.
pub fn client_config(
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<Arc<ClientConfig>, TunnelError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TunnelError::Config(e.to_string()))?
        .with_root_certificates(root_store(ca_pem)?);
    let mut config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(certificates_from_pem(chain)?, private_key_from_pem(key)?)
            .map_err(|e| TunnelError::Config(format!("client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A server's TLS settings. With `client_ca_pem`, client certificates signed
/// by it are verified (and required when `require_client_cert`).
pub fn server_config(
    chain_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
    require_client_cert: bool,
) -> Result<Arc<ServerConfig>, TunnelError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TunnelError::Config(e.to_string()))?;
    let builder = match client_ca_pem {
        Some(pem) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(pem)?), provider());
            let verifier = if require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| TunnelError::Config(format!("client CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(
            certificates_from_pem(chain_pem)?,
            private_key_from_pem(key_pem)?,
        )
        .map_err(|e| TunnelError::Config(format!("server certificate: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One DER element: (tag, contents, rest). Total: any input gives `None` or
/// slices inside it.
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// The subject common name of an X.509 certificate in DER (e.g.
/// `system:node:worker-1` for a k3s node), or `None`.
pub fn certificate_common_name(der: &[u8]) -> Option<String> {
    let (0x30, cert, _) = der_next(der)? else {
        return None;
    };
    let (0x30, tbs, _) = der_next(cert)? else {
        return None;
    };
    let mut fields = tbs;
    let (tag, _, rest) = der_next(fields)?;
    if tag == 0xa0 {
        fields = rest; // explicit version
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        fields = der_next(fields)?.2;
    }
    let (0x30, mut subject, _) = der_next(fields)? else {
        return None;
    };
    while !subject.is_empty() {
        let (set_tag, mut set, rest) = der_next(subject)?;
        subject = rest;
        if set_tag != 0x31 {
            return None;
        }
        while !set.is_empty() {
            let (_, attr, rest) = der_next(set)?;
            set = rest;
            let (0x06, oid, value) = der_next(attr)? else {
                return None;
            };
            if oid != OID_COMMON_NAME {
                continue;
            }
            let (vtag, value, _) = der_next(value)?;
            // UTF8String, PrintableString, T61String, IA5String.
            if matches!(vtag, 0x0c | 0x13 | 0x14 | 0x16) {
                return std::str::from_utf8(value).ok().map(str::to_owned);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_name_from_generated_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:nodes");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:worker-1");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            certificate_common_name(cert.der()).as_deref(),
            Some("system:node:worker-1")
        );
        // Every truncation and a flipped length byte: None or a string, never a panic.
        let der = cert.der().to_vec();
        for cut in 0..der.len() {
            let _ = certificate_common_name(&der[..cut]);
        }
        for i in 0..der.len().min(200) {
            let mut bad = der.clone();
            bad[i] ^= 0xff;
            let _ = certificate_common_name(&bad);
        }
    }
}
