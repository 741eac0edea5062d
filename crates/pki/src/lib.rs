//! Certificates and TLS: the dev CA and the node and client certificates it
//! issues, rustls configurations (TLS 1.2 and 1.3 only, ring provider), and
//! the caller identity a client certificate carries in its SAN URIs:
//! `urn:hie:ods:<ODS code>` (exactly one) and `urn:hie:role:<role>` (one or more).

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use hie_domain::{Caller, OdsCode, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub const ODS_URI_PREFIX: &str = "urn:hie:ods:";
pub const ROLE_URI_PREFIX: &str = "urn:hie:role:";
const CA_COMMON_NAME: &str = "hie dev CA";
/// How long dev certificates are valid.
pub const DEV_CERT_VALIDITY_DAYS: i64 = 825;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("tls configuration: {0}")]
    Tls(String),
    #[error("client certificate: {0}")]
    Identity(String),
}

/// A PEM certificate and its PEM private key.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// The ring crypto provider, the only one this project uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide default provider (idempotent).
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "hie");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params);
    Ok(params)
}

fn set_validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(DEV_CERT_VALIDITY_DAYS);
}

/// A certificate authority for a dev or test cluster.
pub struct DevCa {
    key: KeyPair,
    pub pem: Pem,
}

impl DevCa {
    pub fn generate() -> Result<DevCa, PkiError> {
        let key = KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&key)?;
        let pem = Pem { cert: cert.pem(), key: key.serialize_pem() };
        Ok(DevCa { key, pem })
    }

    /// Loads a CA written by [`DevCa::generate`] (to issue more certificates).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<DevCa, PkiError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| PkiError::File { path: p.display().to_string(), message: e.to_string() })
        };
        let cert = read(cert_path)?;
        let key_pem = read(key_path)?;
        let key = KeyPair::from_pem(&key_pem)?;
        Ok(DevCa { key, pem: Pem { cert, key: key_pem } })
    }

    fn issue(&self, mut params: CertificateParams) -> Result<Pem, PkiError> {
        set_validity(&mut params);
        let key = KeyPair::generate()?;
        let issuer = Issuer::new(ca_params()?, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
    }

    /// A node's server certificate for the given DNS names and IP addresses.
    pub fn issue_node(&self, name: &str, dns: &[&str], ips: &[IpAddr]) -> Result<Pem, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        for d in dns {
            params.subject_alt_names.push(SanType::DnsName((*d).try_into()?));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate naming its organisation and roles in SAN URIs.
    pub fn issue_client(&self, name: &str, ods: &OdsCode, roles: &[Role]) -> Result<Pem, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names.push(SanType::URI(format!("{ODS_URI_PREFIX}{}", ods.as_str()).try_into()?));
        for role in roles {
            params.subject_alt_names.push(SanType::URI(format!("{ROLE_URI_PREFIX}{}", role.as_str()).try_into()?));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let err = |m: String| PkiError::File { path: path.display().to_string(), message: m };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in file".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| PkiError::File { path: path.display().to_string(), message: e.to_string() })
}

fn roots(ca_path: &Path) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca_path)? {
        roots.add(c).map_err(|e| PkiError::Tls(e.to_string()))?;
    }
    Ok(roots)
}

/// The API server's TLS: its certificate, and client certificates required
/// and verified against the cluster CA.
pub fn server_config(cert: &Path, key: &Path, ca: &Path) -> Result<ServerConfig, PkiError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider.clone())
        .build()
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A client's TLS: trusts the cluster CA, presents a client certificate.
pub fn client_config(ca: &Path, cert: Option<(&Path, &Path)>) -> Result<ClientConfig, PkiError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_root_certificates(roots(ca)?);
    let mut config = match cert {
        Some((c, k)) => {
            builder.with_client_auth_cert(load_certs(c)?, load_key(k)?).map_err(|e| PkiError::Tls(e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The caller a verified client certificate names.
pub fn caller_from_cert(der: &[u8]) -> Result<Caller, PkiError> {
    use x509_parser::prelude::*;
    let bad = |m: &str| PkiError::Identity(m.to_owned());
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| bad("not an X.509 certificate"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| bad("malformed subjectAltName"))?
        .ok_or_else(|| bad("no subjectAltName"))?;
    let mut ods = None;
    let mut roles = std::collections::BTreeSet::new();
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            if let Some(code) = uri.strip_prefix(ODS_URI_PREFIX) {
                if ods.is_some() {
                    return Err(bad("more than one ODS code"));
                }
                ods = Some(OdsCode::parse(code).map_err(|e| PkiError::Identity(e.to_string()))?);
            } else if let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX) {
                roles.insert(Role::parse(role).ok_or_else(|| bad("unknown role"))?);
            }
        }
    }
    let ods = ods.ok_or_else(|| bad("no urn:hie:ods: URI"))?;
    if roles.is_empty() {
        return Err(bad("no urn:hie:role: URI"));
    }
    Ok(Caller { ods, roles })
}

/// When a PEM certificate expires, in Unix seconds.
pub fn not_after_unix(cert_path: &Path) -> Result<i64, PkiError> {
    use x509_parser::prelude::*;
    let der = load_certs(cert_path)?.remove(0);
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|_| PkiError::Identity("not an X.509 certificate".into()))?;
    Ok(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_certificate_carries_ods_and_roles() {
        let ca = DevCa::generate().unwrap();
        let pem = ca.issue_client("gp", &OdsCode::parse("A81001").unwrap(), &[Role::Producer, Role::Consumer]).unwrap();
        let der = CertificateDer::from_pem_slice(pem.cert.as_bytes()).unwrap();
        let caller = caller_from_cert(&der).unwrap();
        assert_eq!(caller.ods.as_str(), "A81001");
        assert!(caller.has(Role::Producer) && caller.has(Role::Consumer) && !caller.has(Role::Operator));
    }

    #[test]
    fn node_certificate_has_no_identity() {
        let ca = DevCa::generate().unwrap();
        let pem = ca.issue_node("node-1", &["localhost"], &["127.0.0.1".parse().unwrap()]).unwrap();
        let der = CertificateDer::from_pem_slice(pem.cert.as_bytes()).unwrap();
        assert!(caller_from_cert(&der).is_err());
    }
}
