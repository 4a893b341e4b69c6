//! The policy parser on arbitrary input: whatever the bytes, loading
//! returns a policy or positioned errors, never panics; a policy that loads
//! also compiles and answers `explain` without panicking.
#![no_main]

use std::time::{Duration, SystemTime};

use ipguard_policy::{self as policy, Explainer, Proto};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A fixed "now": the same input always takes the same path.
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
    match policy::parse_str_at("fuzz.yaml", text, now) {
        Err(errors) => {
            assert!(!errors.errors.is_empty());
            let _ = errors.to_string();
        }
        Ok(loaded) => {
            for w in &loaded.warnings {
                let _ = w.to_string();
            }
            for at in [now, now + Duration::from_secs(86_400 * 3 + 3_600 * 7)] {
                let compiled = policy::compile(&loaded.policy, at, &[]);
                let ex = Explainer::new(&compiled);
                for (net, _) in compiled.v4.iter().take(64) {
                    for port in [None, Some((Proto::Tcp, 22)), Some((Proto::Udp, 443))] {
                        let r = ex.explain_ref(net.addr().into(), port);
                        let _ = r.describe(Some("tcp/22"));
                    }
                }
                for (net, _) in compiled.v6.iter().take(64) {
                    let _ = ex.explain(net.addr().into(), Some((Proto::Tcp, 80)));
                }
                let _ = ex.explain(std::net::Ipv4Addr::UNSPECIFIED.into(), None);
            }
        }
    }
});
