//! What is pinned under the pin directory, and removing it.

use super::*;

/// The interfaces with a pinned ipguard link.
pub fn pinned_links(pin_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(pin_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_prefix("link_") {
                out.push(iface.to_string());
            }
        }
    }
    out.sort();
    out
}

/// Whether anything of ipguard is pinned under `pin_dir`: a link, or the
/// maps of a policy.
pub fn is_loaded(pin_dir: &Path) -> bool {
    !pinned_links(pin_dir).is_empty() || pin_dir.join(MAP_ACTIVE).exists()
}

/// Detaches from `iface` (or every interface) and, when nothing stays
/// attached, removes every pinned object.
pub fn unload(pin_dir: &Path, ifaces: &[String]) -> Result<Vec<String>> {
    ensure_root()?;
    if !is_loaded(pin_dir) {
        return Err(DatapathError::NotLoaded(pin_dir.to_path_buf()));
    }
    let all = pinned_links(pin_dir);
    let mut detached = Vec::new();
    for iface in &all {
        if !ifaces.is_empty() && !ifaces.contains(iface) {
            continue;
        }
        // Detached at once, then unpinned; where the kernel cannot detach
        // a link explicitly, dropping its last reference does it later.
        let xdp_pin = pin_dir.join(format!("link_{iface}"));
        if let Err(e) = sys::detach_pinned_link(&xdp_pin) {
            tracing::debug!(%iface, "BPF_LINK_DETACH: {e}; the link goes with its pin");
        }
        let _ = std::fs::remove_file(&xdp_pin);
        let tc_pin = tc_link_pin(pin_dir, iface);
        if tc_pin.exists() {
            if let Err(e) = sys::detach_pinned_link(&tc_pin) {
                tracing::debug!(%iface, "BPF_LINK_DETACH: {e}; the egress link goes with its pin");
            }
            let _ = std::fs::remove_file(&tc_pin);
        } else {
            // No TCX link: the clsact filter of kernels before 6.6.
            let _ =
                aya::programs::tc::qdisc_detach_program(iface, TcAttachType::Egress, PROG_EGRESS);
        }
        detached.push(iface.clone());
    }
    if pinned_links(pin_dir).is_empty() {
        if let Ok(rd) = std::fs::read_dir(pin_dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        std::fs::remove_dir(pin_dir).map_err(|source| DatapathError::Io {
            what: "cannot remove",
            path: pin_dir.to_path_buf(),
            source,
        })?;
    }
    Ok(detached)
}
