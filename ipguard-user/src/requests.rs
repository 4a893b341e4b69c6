//! Access requests: the refused sources `ipguard blocked` lists, each
//! pending (seen, no decision), approved (a runtime allow holds it) or
//! rejected (`ipguard reject ADDR`). Rejections are kept in the state
//! directory, so a rejected source stays off the pending list across
//! restarts; `ipguard allow` of the same address takes a rejection back.

use std::path::{Path, PathBuf};

use anyhow::Result;
use ipnet::IpNet;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{
    policy::RuntimeKind, protocol::BlockedSource, runtime::RuntimeRecord, state::write_atomic,
};

pub const REJECTED_FILE: &str = "rejected.json";
/// Rejections kept; past it the oldest go (a rejection only hides a source
/// from the pending list: losing one shows it as pending again).
pub const MAX_REJECTIONS: usize = 10_000;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rejection {
    pub addr: IpNet,
    pub at: Timestamp,
    pub label: Option<String>,
}

#[derive(Debug)]
pub struct Rejections {
    path: PathBuf,
    pub list: Vec<Rejection>,
}

impl Rejections {
    /// A missing file is no rejection; a corrupt one an error naming it.
    pub fn load(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join(REJECTED_FILE);
        let list = crate::state::read_list(&path, "the rejected access requests")?;
        Ok(Self { path, list })
    }

    pub fn save(&self) -> Result<()> {
        write_atomic(&self.path, &serde_json::to_vec_pretty(&self.list)?)
    }

    /// Marks `addr` rejected (again: the newer mark replaces the older).
    pub fn reject(&mut self, addr: IpNet, label: Option<String>, at: Timestamp) {
        let addr = addr.trunc();
        self.list.retain(|r| r.addr != addr);
        self.list.push(Rejection { addr, at, label });
        if self.list.len() > MAX_REJECTIONS {
            let over = self.list.len() - MAX_REJECTIONS;
            self.list.drain(..over);
        }
    }

    /// Takes back the rejection of exactly `addr` (an approval); returns
    /// whether there was one.
    pub fn take_back(&mut self, addr: IpNet) -> bool {
        let addr = addr.trunc();
        let before = self.list.len();
        self.list.retain(|r| r.addr != addr);
        self.list.len() != before
    }

    /// Fills each source's status: approved where a runtime allow holds it,
    /// else rejected where a rejection does, else pending.
    pub fn status_of(&self, sources: &mut [BlockedSource], runtime: &[RuntimeRecord]) {
        for s in sources {
            let approved = runtime
                .iter()
                .any(|r| r.kind == RuntimeKind::Allow && r.addr.contains(&s.src));
            let rejected = self.list.iter().any(|r| r.addr.contains(&s.src));
            s.status = if approved {
                RequestStatus::Approved
            } else if rejected {
                RequestStatus::Rejected
            } else {
                RequestStatus::Pending
            };
        }
    }
}

/// What became of a refused source's access request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    /// Seen, no decision.
    #[default]
    Pending,
    /// A runtime allow holds it.
    Approved,
    /// `ipguard reject` marked it.
    Rejected,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Pending => "pending",
            RequestStatus::Approved => "approved",
            RequestStatus::Rejected => "rejected",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(s: &str) -> BlockedSource {
        BlockedSource {
            src: s.parse().unwrap(),
            count: 1,
            first_seen: String::new(),
            last_seen: String::new(),
            service: None,
            status: RequestStatus::Pending,
            last_seq: 0,
        }
    }

    #[test]
    fn approvals_win_rejections_persist_and_are_taken_back() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/tmp")
            .join(format!("requests-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut r = Rejections::load(&dir).unwrap();
        let now = Timestamp::now();
        r.reject(
            "203.0.113.0/24".parse().unwrap(),
            Some("scanner".into()),
            now,
        );
        r.save().unwrap();
        let r = Rejections::load(&dir).unwrap();
        assert_eq!(r.list.len(), 1, "survives a restart");
        let allow = crate::runtime::record(
            RuntimeKind::Allow,
            "203.0.113.9/32".parse().unwrap(),
            None,
            None,
            None,
            std::time::SystemTime::now(),
        )
        .unwrap();
        let mut s = vec![
            source("203.0.113.9"),
            source("203.0.113.10"),
            source("198.51.100.1"),
        ];
        r.status_of(&mut s, &[allow]);
        let got: Vec<&str> = s.iter().map(|x| x.status.as_str()).collect();
        assert_eq!(got, ["approved", "rejected", "pending"]);
        let mut r = r;
        assert!(
            !r.take_back("203.0.113.10/32".parse().unwrap()),
            "only the exact mark"
        );
        assert!(r.take_back("203.0.113.0/24".parse().unwrap()));
        for i in 0..(MAX_REJECTIONS + 5) {
            let a = std::net::Ipv4Addr::from(0x0a00_0000u32 + i as u32);
            r.reject(IpNet::from(std::net::IpAddr::V4(a)), None, now);
        }
        assert_eq!(r.list.len(), MAX_REJECTIONS);
        assert_eq!(r.list[0].addr.to_string(), "10.0.0.5/32", "the oldest went");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
