//! Certificates and TLS: the dev CA and the node and client certificates it
//! issues, rustls configurations (TLS 1.2 and 1.3 only, ring provider), and
//! the caller identity a client certificate carries in its SAN URIs:
//! `urn:hie:ods:<ODS code>` (exactly one) and `urn:hie:role:<role>` (one or more).

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use hie_domain::{Caller, OdsCode, Role};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams,
    SanType, SerialNumber,
};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

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

    /// A CRL listing `revoked` (serial numbers, big-endian, as
    /// [`CertId::serial`] gives them), numbered `number`; valid for as long
    /// as the dev certificates are.
    pub fn issue_crl(&self, revoked: &[Vec<u8>], number: u64) -> Result<String, PkiError> {
        let now = time::OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(DEV_CERT_VALIDITY_DAYS),
            crl_number: SerialNumber::from(number.to_be_bytes().to_vec()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from(serial.clone()),
                    revocation_time: now - time::Duration::minutes(1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let issuer = Issuer::new(ca_params()?, &self.key);
        Ok(params.signed_by(&issuer)?.pem()?)
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
        // Client use too: a node presents it when it calls out (forwarding,
        // notifications to a subscriber's endpoint).
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
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

/// The files a TLS server is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CAs client certificates must chain to (PEM, one or more).
    pub ca: PathBuf,
    /// CRLs of those CAs (PEM, one or more). When set, every CA in `ca`
    /// needs its CRL here: a client certificate whose revocation status is
    /// unknown is refused.
    pub crl: Option<PathBuf>,
}

/// One certificate by issuer and serial number, as a CRL names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertId {
    /// The issuer's Name, DER.
    pub issuer: Vec<u8>,
    /// The serial number, big-endian, as DER encodes it.
    pub serial: Vec<u8>,
}

impl CertId {
    /// The issuer and serial of a DER certificate.
    pub fn of(der: &[u8]) -> Result<CertId, PkiError> {
        use x509_parser::prelude::*;
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|_| PkiError::Identity("not an X.509 certificate".into()))?;
        Ok(CertId {
            issuer: cert.tbs_certificate.issuer.as_raw().to_vec(),
            serial: cert.tbs_certificate.raw_serial().to_vec(),
        })
    }

    /// The issuer and serial of the first certificate in a PEM file.
    pub fn of_pem_file(path: &Path) -> Result<CertId, PkiError> {
        CertId::of(&load_certs(path)?[0])
    }

    /// The serial number in hex, as `openssl x509 -serial` prints it.
    pub fn serial_hex(&self) -> String {
        self.serial.iter().map(|b| format!("{b:02X}")).collect()
    }
}

fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, PkiError> {
    let err = |m: String| PkiError::File { path: path.display().to_string(), message: m };
    let crls: Vec<_> = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if crls.is_empty() {
        return Err(err("no CRL in file".into()));
    }
    Ok(crls)
}

/// The certificates the CRLs list, by issuer and serial.
fn revoked_in(path: &Path, crls: &[CertificateRevocationListDer<'_>]) -> Result<HashSet<CertId>, PkiError> {
    use x509_parser::prelude::*;
    let mut out = HashSet::new();
    for der in crls {
        let (_, crl) = CertificateRevocationList::from_der(der)
            .map_err(|e| PkiError::File { path: path.display().to_string(), message: format!("CRL: {e}") })?;
        let issuer = crl.tbs_cert_list.issuer.as_raw().to_vec();
        for r in crl.iter_revoked_certificates() {
            out.insert(CertId { issuer: issuer.clone(), serial: r.raw_serial().to_vec() });
        }
    }
    Ok(out)
}

/// The serial numbers a PEM CRL file lists (big-endian, as [`CertId::serial`]).
pub fn crl_serials(path: &Path) -> Result<Vec<Vec<u8>>, PkiError> {
    let mut serials: Vec<Vec<u8>> = revoked_in(path, &load_crls(path)?)?.into_iter().map(|id| id.serial).collect();
    serials.sort();
    Ok(serials)
}

/// The API server's TLS: its certificate, and client certificates required,
/// verified against the CAs and refused when a CRL lists them.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, PkiError> {
    Ok(build_server(files)?.0)
}

fn build_server(files: &TlsFiles) -> Result<(ServerConfig, HashSet<CertId>), PkiError> {
    let provider = provider();
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&files.ca)?), provider.clone());
    let mut revoked = HashSet::new();
    if let Some(path) = &files.crl {
        let crls = load_crls(path)?;
        revoked = revoked_in(path, &crls)?;
        // The dev CA and a typical NHS deployment issue end-entity
        // certificates straight from the CA the nodes trust.
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    let verifier = verifier.build().map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((config, revoked))
}

/// A server TLS configuration rebuilt from its files whenever they change,
/// so that a new CRL, CA bundle, certificate or key is taken up without a
/// restart. A change that does not build (a half-written key, a CRL that
/// does not parse) leaves the last good configuration in place.
pub struct ReloadingServerTls {
    files: TlsFiles,
    current: RwLock<Loaded>,
}

struct Loaded {
    config: Arc<ServerConfig>,
    revoked: Arc<HashSet<CertId>>,
    /// What the files held when `config` was built.
    contents: Vec<Vec<u8>>,
}

/// What [`ReloadingServerTls::reload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Changed,
}

impl ReloadingServerTls {
    pub fn load(files: TlsFiles) -> Result<ReloadingServerTls, PkiError> {
        let contents = Self::read(&files)?;
        let (config, revoked) = build_server(&files)?;
        let current = RwLock::new(Loaded { config: Arc::new(config), revoked: Arc::new(revoked), contents });
        Ok(ReloadingServerTls { files, current })
    }

    fn read(files: &TlsFiles) -> Result<Vec<Vec<u8>>, PkiError> {
        let paths = [Some(&files.cert), Some(&files.key), Some(&files.ca), files.crl.as_ref()];
        paths
            .into_iter()
            .flatten()
            .map(|p| {
                std::fs::read(p).map_err(|e| PkiError::File { path: p.display().to_string(), message: e.to_string() })
            })
            .collect()
    }

    /// The configuration new connections are accepted with.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls lock").config.clone()
    }

    /// Whether the current CRLs list the certificate: for connections that
    /// were accepted before it was revoked.
    pub fn is_revoked(&self, id: &CertId) -> bool {
        self.current.read().expect("tls lock").revoked.contains(id)
    }

    /// How many certificates the current CRLs list.
    pub fn revoked_count(&self) -> usize {
        self.current.read().expect("tls lock").revoked.len()
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Reads the files again and, if any changed, rebuilds the configuration.
    pub fn reload(&self) -> Result<Reload, PkiError> {
        let contents = Self::read(&self.files)?;
        if self.current.read().expect("tls lock").contents == contents {
            return Ok(Reload::Unchanged);
        }
        let (config, revoked) = build_server(&self.files)?;
        *self.current.write().expect("tls lock") =
            Loaded { config: Arc::new(config), revoked: Arc::new(revoked), contents };
        Ok(Reload::Changed)
    }
}

/// A client's TLS: trusts the cluster CA, presents a client certificate.
pub fn client_config(ca: &Path, cert: Option<(&Path, &Path)>) -> Result<ClientConfig, PkiError> {
    client_config_trusting(&[ca], cert)
}

/// A client's TLS trusting every CA in `cas` (PEM files, each may hold several).
pub fn client_config_trusting(cas: &[&Path], cert: Option<(&Path, &Path)>) -> Result<ClientConfig, PkiError> {
    let mut all = RootCertStore::empty();
    for ca in cas {
        all.roots.extend(roots(ca)?.roots);
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_root_certificates(all);
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

    /// Writes a dev CA, a node certificate, two clients and an empty CRL.
    struct Dir {
        dir: tempfile::TempDir,
        ca: DevCa,
    }

    impl Dir {
        fn new() -> Dir {
            let dir = tempfile::tempdir().unwrap();
            let ca = DevCa::generate().unwrap();
            let d = Dir { dir, ca };
            d.write("ca.pem", &d.ca.pem.cert);
            let node = d.ca.issue_node("node", &["localhost"], &[]).unwrap();
            d.write("node.pem", &node.cert);
            d.write("node.key", &node.key);
            for name in ["a", "b"] {
                let pem = d.ca.issue_client(name, &OdsCode::parse("A81001").unwrap(), &[Role::Consumer]).unwrap();
                d.write(&format!("{name}.pem"), &pem.cert);
                d.write(&format!("{name}.key"), &pem.key);
            }
            d.write("ca.crl.pem", &d.ca.issue_crl(&[], 1).unwrap());
            d
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.path(name), text).unwrap();
        }

        fn files(&self) -> TlsFiles {
            TlsFiles {
                cert: self.path("node.pem"),
                key: self.path("node.key"),
                ca: self.path("ca.pem"),
                crl: Some(self.path("ca.crl.pem")),
            }
        }

        fn revoke(&self, clients: &[&str], number: u64) {
            let serials: Vec<Vec<u8>> =
                clients.iter().map(|c| CertId::of_pem_file(&self.path(&format!("{c}.pem"))).unwrap().serial).collect();
            self.write("ca.crl.pem", &self.ca.issue_crl(&serials, number).unwrap());
        }

        /// A full handshake in memory: what the client's and the server's side ended with.
        fn handshake(&self, server: Arc<ServerConfig>, client: &str) -> Result<(), rustls::Error> {
            let (c, k) = (self.path(&format!("{client}.pem")), self.path(&format!("{client}.key")));
            let cc = client_config(&self.path("ca.pem"), Some((&c, &k))).unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut cl = rustls::ClientConnection::new(Arc::new(cc), name).unwrap();
            let mut sv = rustls::ServerConnection::new(server).unwrap();
            for _ in 0..10 {
                let mut buf = Vec::new();
                while cl.wants_write() {
                    cl.write_tls(&mut buf).unwrap();
                }
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    sv.read_tls(&mut rd).unwrap();
                }
                sv.process_new_packets()?;
                let mut buf = Vec::new();
                while sv.wants_write() {
                    sv.write_tls(&mut buf).unwrap();
                }
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    cl.read_tls(&mut rd).unwrap();
                }
                cl.process_new_packets()?;
                if !cl.is_handshaking() && !sv.is_handshaking() {
                    return Ok(());
                }
            }
            panic!("the handshake did not finish");
        }
    }

    #[test]
    fn a_client_the_crl_lists_is_refused_and_others_are_not() {
        let d = Dir::new();
        d.revoke(&["a"], 2);
        let tls = ReloadingServerTls::load(d.files()).unwrap();
        assert!(d.handshake(tls.config(), "a").is_err(), "a revoked client completed a handshake");
        d.handshake(tls.config(), "b").unwrap();
        let a = CertId::of_pem_file(&d.path("a.pem")).unwrap();
        let b = CertId::of_pem_file(&d.path("b.pem")).unwrap();
        assert!(tls.is_revoked(&a) && !tls.is_revoked(&b));
        assert_eq!(tls.revoked_count(), 1);
    }

    #[test]
    fn a_changed_crl_is_taken_up_by_reload_and_a_broken_one_keeps_the_last_good() {
        let d = Dir::new();
        let tls = ReloadingServerTls::load(d.files()).unwrap();
        d.handshake(tls.config(), "a").unwrap();
        assert_eq!(tls.reload().unwrap(), Reload::Unchanged);
        d.revoke(&["a"], 2);
        assert_eq!(tls.reload().unwrap(), Reload::Changed);
        assert!(d.handshake(tls.config(), "a").is_err());
        d.handshake(tls.config(), "b").unwrap();
        d.write("ca.crl.pem", "-----BEGIN X509 CRL-----\nnot a crl\n-----END X509 CRL-----\n");
        assert!(tls.reload().is_err(), "a CRL that does not parse was accepted");
        assert!(d.handshake(tls.config(), "a").is_err(), "a failed reload dropped the revocation");
        assert!(tls.is_revoked(&CertId::of_pem_file(&d.path("a.pem")).unwrap()));
    }

    #[test]
    fn a_crl_from_another_ca_is_not_trusted() {
        let d = Dir::new();
        let other = DevCa::generate().unwrap();
        let serial = CertId::of_pem_file(&d.path("a.pem")).unwrap().serial;
        d.write("ca.crl.pem", &other.issue_crl(&[serial], 2).unwrap());
        let tls = ReloadingServerTls::load(d.files()).unwrap();
        // Its issuer is not the CA that issued the clients: their status is
        // unknown, and unknown is refused.
        assert!(d.handshake(tls.config(), "b").is_err());
    }

    #[test]
    fn a_rotated_server_certificate_is_served_after_reload() {
        let d = Dir::new();
        let tls = ReloadingServerTls::load(d.files()).unwrap();
        let before = tls.config().cert_resolver.clone();
        let node = d.ca.issue_node("node", &["localhost"], &[]).unwrap();
        // The key first: until the certificate matches it, the old pair stays.
        d.write("node.key", &node.key);
        assert!(tls.reload().is_err());
        d.write("node.pem", &node.cert);
        assert_eq!(tls.reload().unwrap(), Reload::Changed);
        assert!(!Arc::ptr_eq(&before, &tls.config().cert_resolver));
        d.handshake(tls.config(), "a").unwrap();
    }

    #[test]
    fn node_certificate_has_no_identity() {
        let ca = DevCa::generate().unwrap();
        let pem = ca.issue_node("node-1", &["localhost"], &["127.0.0.1".parse().unwrap()]).unwrap();
        let der = CertificateDer::from_pem_slice(pem.cert.as_bytes()).unwrap();
        assert!(caller_from_cert(&der).is_err());
    }
}
