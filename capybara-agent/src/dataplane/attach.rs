//! Attaching the programs, and keeping them attached across agent restarts.
//!
//! - `xdp_guard` on the uplink: a BPF link in driver (native) mode, falling back to SKB
//!   (generic) mode when the driver has no XDP support.
//! - `tc_ingress` / `tc_egress` on the tunnel device: TCX links (kernel ≥ 6.6; aya 0.14 uses them).
//!
//! Every link is pinned at `<bpffs>/links/<prog>_<ifname>` ([`crate::paths::link_pin`]): the
//! kernel keeps it — and the program enforcing — after the agent exits (the default on shutdown).
//! On restart, an existing pin is opened and the freshly loaded program is swapped into the
//! **same link** with `BPF_LINK_UPDATE` (aya's `attach_to_link`): the hook never runs without a
//! program. A pin whose interface is gone (the update fails with `ENOLINK`) is removed and a new
//! link is made. [`Dataplane::detach`] removes the pins, which detaches the programs.

use std::path::PathBuf;

use aya::programs::{
    Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifier, SchedClassifierLink, TcAttachType},
    xdp::XdpLink,
};
use capybara_common::maps::{PROG_TC_EGRESS, PROG_TC_INGRESS, PROG_XDP_GUARD};

use super::{Dataplane, DataplaneError, Result};
use crate::paths;

/// A link this process attached or took over; dropping it closes the fd (the pin keeps the link).
#[derive(Debug)]
pub(super) struct HeldLink {
    #[expect(
        dead_code,
        reason = "held for its fd; the pin is what keeps the link alive"
    )]
    link: FdLink,
    pin: PathBuf,
}

/// How a program was attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachHow {
    /// A new XDP link in driver (native) mode.
    XdpDriver,
    /// A new XDP link in SKB (generic) mode: the driver has no native XDP.
    XdpSkb,
    /// A new TCX link.
    Tcx,
    /// The program replaced the previous agent's program inside the existing pinned link.
    Replaced,
}

/// Where a program was attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Program name.
    pub prog: &'static str,
    /// Interface name.
    pub ifname: String,
    /// How.
    pub how: AttachHow,
    /// The link's pin.
    pub pin: PathBuf,
}

fn prog_err(
    prog: &'static str,
    ifname: &str,
    op: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> DataplaneError {
    let ifname = ifname.to_owned();
    move |e| match e {
        aya::programs::ProgramError::UnknownInterface { name } => {
            DataplaneError::UnknownInterface { ifname: name }
        }
        e => DataplaneError::Program {
            prog,
            ifname,
            op,
            source: Box::new(e),
        },
    }
}

fn pin_err<E: std::error::Error + Send + Sync + 'static>(
    path: &std::path::Path,
    op: &'static str,
) -> impl FnOnce(E) -> DataplaneError {
    let path = path.to_path_buf();
    move |e| DataplaneError::LinkPin {
        path,
        op,
        source: Box::new(e),
    }
}

fn ifindex(ifname: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(ifname).map_err(|_| DataplaneError::UnknownInterface {
        ifname: ifname.to_owned(),
    })
}

/// Opens an existing link pin, if any.
fn existing_link(pin: &std::path::Path) -> Result<Option<FdLink>> {
    if !pin.exists() {
        return Ok(None);
    }
    PinnedLink::from_pin(pin)
        .map(|p| Some(FdLink::from(p)))
        .map_err(pin_err(pin, "open"))
}

/// Removes a stale pin.
fn remove_pin(pin: &std::path::Path) -> Result<()> {
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(pin_err(pin, "remove")(e)),
    }
}

impl Dataplane {
    fn xdp_prog(&mut self) -> Result<&mut Xdp> {
        let p: &mut Xdp = self
            .ebpf
            .program_mut(PROG_XDP_GUARD)
            .ok_or(DataplaneError::ProgramMissing {
                prog: PROG_XDP_GUARD,
            })?
            .try_into()
            .map_err(|_| DataplaneError::ProgramMissing {
                prog: PROG_XDP_GUARD,
            })?;
        if p.fd().is_err() {
            p.load().map_err(prog_err(PROG_XDP_GUARD, "", "load"))?;
        }
        Ok(p)
    }

    fn tc_prog(&mut self, name: &'static str) -> Result<&mut SchedClassifier> {
        let p: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DataplaneError::ProgramMissing { prog: name })?
            .try_into()
            .map_err(|_| DataplaneError::ProgramMissing { prog: name })?;
        if p.fd().is_err() {
            p.load().map_err(prog_err(name, "", "load"))?;
        }
        Ok(p)
    }

    /// Attaches `xdp_guard` to the uplink `ifname` (or swaps it into the pinned link a previous
    /// agent left there).
    pub fn attach_xdp(&mut self, ifname: &str) -> Result<Attachment> {
        ifindex(ifname)?;
        let pin = paths::link_pin(&self.config.bpffs_dir, PROG_XDP_GUARD, ifname);
        let prog = self.xdp_prog()?;
        if let Some(old) = existing_link(&pin)? {
            let replaced = XdpLink::try_from(old)
                .map_err(|e| e.to_string())
                .and_then(|l| prog.attach_to_link(l).map_err(|e| e.to_string()));
            match replaced {
                Ok(id) => {
                    let link = prog.take_link(id).map_err(prog_err(
                        PROG_XDP_GUARD,
                        ifname,
                        "take link",
                    ))?;
                    let link = FdLink::try_from(link).map_err(pin_err(&pin, "convert"))?;
                    return Ok(self.held(PROG_XDP_GUARD, ifname, AttachHow::Replaced, link, pin));
                }
                Err(e) => {
                    tracing::warn!(pin = %pin.display(), error = %e, "stale XDP link pin; attaching anew");
                    remove_pin(&pin)?;
                }
            }
        }
        let prog = self.xdp_prog()?;
        let (id, how) = match prog.attach(ifname, XdpMode::Driver) {
            Ok(id) => (id, AttachHow::XdpDriver),
            Err(e) => {
                tracing::info!(ifname, error = %e, "native XDP unavailable, using SKB mode");
                let id = prog.attach(ifname, XdpMode::Skb).map_err(prog_err(
                    PROG_XDP_GUARD,
                    ifname,
                    "attach",
                ))?;
                (id, AttachHow::XdpSkb)
            }
        };
        let link = prog
            .take_link(id)
            .map_err(prog_err(PROG_XDP_GUARD, ifname, "take link"))?;
        let link = FdLink::try_from(link).map_err(pin_err(&pin, "convert"))?;
        let pinned = link.pin(&pin).map_err(pin_err(&pin, "pin"))?;
        Ok(self.held(PROG_XDP_GUARD, ifname, how, FdLink::from(pinned), pin))
    }

    /// Attaches `tc_ingress` and `tc_egress` to the tunnel device `ifname` (TCX links).
    pub fn attach_tc(&mut self, ifname: &str) -> Result<[Attachment; 2]> {
        let index = ifindex(ifname)?;
        self.start_shaping(ifname, index)?;
        let attached = [
            self.attach_one_tc(PROG_TC_INGRESS, TcAttachType::Ingress, ifname)?,
            self.attach_one_tc(PROG_TC_EGRESS, TcAttachType::Egress, ifname)?,
        ];
        // The old programs of a migrated layout count no more: carry their last counts over.
        self.finish_migration()?;
        Ok(attached)
    }

    fn attach_one_tc(
        &mut self,
        name: &'static str,
        at: TcAttachType,
        ifname: &str,
    ) -> Result<Attachment> {
        let pin = paths::link_pin(&self.config.bpffs_dir, name, ifname);
        let prog = self.tc_prog(name)?;
        if let Some(old) = existing_link(&pin)? {
            let replaced = SchedClassifierLink::try_from(old)
                .map_err(|e| e.to_string())
                .and_then(|l| prog.attach_to_link(l).map_err(|e| e.to_string()));
            match replaced {
                Ok(id) => {
                    let link = prog
                        .take_link(id)
                        .map_err(prog_err(name, ifname, "take link"))?;
                    let link = FdLink::try_from(link).map_err(pin_err(&pin, "convert"))?;
                    return Ok(self.held(name, ifname, AttachHow::Replaced, link, pin));
                }
                Err(e) => {
                    tracing::warn!(pin = %pin.display(), error = %e, "stale TC link pin; attaching anew");
                    remove_pin(&pin)?;
                }
            }
        }
        let prog = self.tc_prog(name)?;
        let id = prog
            .attach(ifname, at)
            .map_err(prog_err(name, ifname, "attach"))?;
        let link = prog
            .take_link(id)
            .map_err(prog_err(name, ifname, "take link"))?;
        let link = FdLink::try_from(link).map_err(pin_err(&pin, "convert"))?;
        let pinned = link.pin(&pin).map_err(pin_err(&pin, "pin"))?;
        Ok(self.held(name, ifname, AttachHow::Tcx, FdLink::from(pinned), pin))
    }

    fn held(
        &mut self,
        prog: &'static str,
        ifname: &str,
        how: AttachHow,
        link: FdLink,
        pin: PathBuf,
    ) -> Attachment {
        tracing::info!(prog, ifname, ?how, pin = %pin.display(), "program attached");
        self.links.retain(|l| l.pin != pin);
        self.links.push(HeldLink {
            link,
            pin: pin.clone(),
        });
        Attachment {
            prog,
            ifname: ifname.to_owned(),
            how,
            pin,
        }
    }

    /// The link pins under `<bpffs>/links/` (each an attached program).
    pub fn pinned_links(&self) -> Result<Vec<PathBuf>> {
        let dir = paths::links_dir(&self.config.bpffs_dir);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(pin_err(&dir, "list")(e)),
        };
        let mut out: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        out.sort();
        Ok(out)
    }

    /// Detaches every program: removes every link pin under `<bpffs>/links/` and closes the
    /// links this process holds. Maps (and their counters) stay pinned.
    pub fn detach(&mut self) -> Result<Vec<PathBuf>> {
        let pins = self.pinned_links()?;
        for p in &pins {
            remove_pin(p)?;
            tracing::info!(pin = %p.display(), "program detached");
        }
        self.links.clear();
        self.detach_sockets();
        if let Some(mut shaper) = self.shaper.take() {
            shaper.remove_proxy_devices()?;
            shaper.remove_ifb()?;
        }
        Ok(pins)
    }
}
