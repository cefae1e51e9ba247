//! The service's view of the tunnel: [`crate::service::ports::TunnelPort`] for [`WgTunnel`].
//! Keys cross as their 32 bytes; allowed IPs as networks.

use ipnet::IpNet;

use super::{PeerConfig, PublicKey, WgError, WgTunnel};
use crate::{
    net::Cidr,
    service::{
        domain,
        ports::{TunnelPeerStatus, TunnelPort, TunnelPortError, TunnelTelemetry},
    },
};

fn key(k: &domain::PublicKey) -> PublicKey {
    PublicKey::from_bytes(k.0)
}

fn failed(op: &'static str) -> impl FnOnce(WgError) -> TunnelPortError {
    move |e| TunnelPortError::Failed {
        op,
        source: Box::new(e),
    }
}

/// The tunnel's configuration of a peer the service adds.
fn peer_config(k: &domain::PublicKey, allowed: &[Cidr]) -> PeerConfig {
    PeerConfig {
        public_key: key(k),
        preshared_key: None,
        allowed_ips: allowed
            .iter()
            .filter_map(|c| IpNet::new(c.addr(), c.prefix_len()).ok())
            .collect(),
        persistent_keepalive: None,
    }
}

impl TunnelPort for WgTunnel {
    fn add_peer(&self, k: domain::PublicKey, allowed: &[Cidr]) -> Result<(), TunnelPortError> {
        let cfg = peer_config(&k, allowed);
        match WgTunnel::add_peer(self, cfg.clone()) {
            Err(WgError::PeerExists { .. }) => self.update_peer(cfg).map_err(failed("add_peer")),
            r => r.map_err(failed("add_peer")),
        }
    }

    /// Peers the tunnel has are updated one by one; the others are added in one batch.
    fn add_peers(&self, peers: &[(domain::PublicKey, Vec<Cidr>)]) -> Result<(), TunnelPortError> {
        let (known, new): (Vec<_>, Vec<_>) = peers
            .iter()
            .map(|(k, allowed)| peer_config(k, allowed))
            .partition(|cfg| self.has_peer(&cfg.public_key));
        for cfg in known {
            self.update_peer(cfg).map_err(failed("add_peer"))?;
        }
        WgTunnel::add_peers(self, new).map_err(failed("add_peer"))
    }

    fn remove_peer(&self, k: &domain::PublicKey) -> Result<(), TunnelPortError> {
        WgTunnel::remove_peer(self, &key(k)).map_err(failed("remove_peer"))
    }

    fn kick(&self, k: &domain::PublicKey) -> Result<(), TunnelPortError> {
        WgTunnel::kick(self, &key(k)).map_err(failed("kick"))
    }

    fn peers(&self) -> Vec<TunnelPeerStatus> {
        WgTunnel::peers(self)
            .into_iter()
            .map(|p| TunnelPeerStatus {
                key: domain::PublicKey(*p.public_key.as_bytes()),
                endpoint: p.endpoint,
                last_handshake: p.last_handshake,
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                connected: p.connected,
            })
            .collect()
    }

    fn endpoint(&self, k: &domain::PublicKey) -> Option<std::net::SocketAddr> {
        WgTunnel::peer(self, &key(k)).and_then(|p| p.endpoint)
    }

    fn dead_threads(&self) -> Vec<String> {
        WgTunnel::dead_threads(self)
    }
    fn telemetry(&self) -> TunnelTelemetry {
        let h = self.handshakes();
        TunnelTelemetry {
            sessions_online: self.connected_peers() as u64,
            handshakes_completed: h.completed,
            handshakes_failed: vec![
                ("unknown-key", h.unknown_key),
                ("bad-mac", h.bad_mac),
                ("undecryptable", h.undecryptable),
                ("rejected", h.rejected),
            ],
        }
    }
}
