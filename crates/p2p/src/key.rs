//! The node's persistent libp2p key: its PeerId is its identity in the membership.

use std::io::Write;
use std::path::Path;

use libp2p::PeerId;
use libp2p::identity::Keypair;

use crate::P2pError;

/// Loads the key at `path`, or creates one (mode 0600, fsynced) if absent.
pub fn load_or_create_key(path: &Path) -> Result<Keypair, P2pError> {
    let err = |m: String| P2pError::Key { path: path.display().to_string(), message: m };
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
            }
            let tmp = path.with_extension("partial");
            let mut f = std::fs::File::create(&tmp).map_err(|e| err(e.to_string()))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(|e| err(e.to_string()))?;
            }
            f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(|e| err(e.to_string()))?;
            std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// The PeerId of the key at `path`, creating the key if needed.
pub fn peer_id_of_key_file(path: &Path) -> Result<PeerId, P2pError> {
    Ok(load_or_create_key(path)?.public().to_peer_id())
}
