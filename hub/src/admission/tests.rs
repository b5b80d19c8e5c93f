//! Data-driven tests of the admission rules: one candidate, one policy per case, the verdicts as text.

use super::*;

fn workload(name: &str) -> WorkloadFacts {
    WorkloadFacts {
        name: name.into(),
        release: "sensor".into(),
        signers: vec!["00112233aabbccdd".into()],
        set: BTreeMap::from([("memory_mib", 64)]),
        effective: BTreeMap::from([("memory_mib", 64), ("cpu_ms", 50)]),
        host_network: false,
        devices: false,
        capabilities: vec![],
    }
}

fn candidate() -> Candidate {
    Candidate {
        workloads: vec![workload("sensor")],
        regions: BTreeSet::from([Some("eu-west".to_owned()), Some("us-east".to_owned())]),
        placed: 40,
        rollout: None,
        wave_sizes: vec![40],
    }
}

/// Denials only, as `rule field: message`.
fn denials(policy: &str, c: &Candidate) -> String {
    let p = Policy::parse("policy.toml", policy).expect("valid policy");
    evaluate(&p, c)
        .into_iter()
        .filter(|v| !v.allowed)
        .map(|v| format!("{} {}: {}", v.rule, v.field, v.message))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn rules_refuse_naming_rule_and_field() {
    let mut container = candidate();
    let mut w = workload("gw");
    w.effective.insert("pids", 0);
    w.host_network = true;
    w.capabilities = vec!["NET_ADMIN".into(), "SYS_TIME".into()];
    container.workloads = vec![w];
    let mut rolled = candidate();
    rolled.rollout = Some(vec![Wave::Regions(vec!["eu-west".into()]), Wave::Rest]);
    rolled.wave_sizes = vec![20, 120];
    let plain = candidate();
    let cases: Vec<(&str, &Candidate, &str)> = vec![
        ("", &plain, ""),
        (
            "[resources]\nmemory_mib = { max = 32 }",
            &plain,
            "resources.memory_mib workloads[0].memory_mib: sensor: memory_mib = 64 is above the maximum 32",
        ),
        ("[resources]\nmemory_mib = { max = 64 }", &plain, ""),
        (
            "[resources]\ncpu_ms = { required = true }",
            &plain,
            "resources.cpu_ms workloads[0].cpu_ms: sensor: cpu_ms must be set",
        ),
        // pids is a container field: a WASM workload is not judged on it; a container with no limit (0) is over.
        ("[resources]\npids = { max = 100 }", &plain, ""),
        (
            "[resources]\npids = { max = 100 }",
            &container,
            "resources.pids workloads[0].pids: gw: pids = 0 is above the maximum 100",
        ),
        (
            "[[releases]]\nregions = [\"eu-west\"]\nnames = [\"sens*\"]",
            &plain,
            "",
        ),
        (
            "[[releases]]\nregions = [\"eu-west\"]\nnames = [\"camera\"]",
            &plain,
            "releases[0] workloads[0].release: sensor: release sensor is not allowed in [\"eu-west\"] (allowed: camera)",
        ),
        (
            "[[releases]]\nregions = [\"ap-south\"]\nnames = [\"camera\"]",
            &plain,
            "",
        ),
        (
            "[[releases]]\nregions = [\"*\"]\nsigners = [\"ffffffffffffffff\"]",
            &plain,
            "releases[0] workloads[0].release: sensor: release sensor is signed by 00112233aabbccdd and [\"*\"] allows only ffffffffffffffff",
        ),
        (
            "[[releases]]\nregions = [\"*\"]\nsigners = [\"00112233AABBCCDD\"]",
            &plain,
            "",
        ),
        (
            "[containers]",
            &container,
            "containers workloads[0].container.network: gw: host network are forbidden in the regions it reaches\ncontainers workloads[0].container.capabilities: gw: capability NET_ADMIN is forbidden in the regions it reaches\ncontainers workloads[0].container.capabilities: gw: capability SYS_TIME is forbidden in the regions it reaches",
        ),
        // Granted in one region only: the deployment also reaches us-east, so still refused.
        (
            "[containers.regions.eu-west]\nhost_network = true\ncapabilities = [\"*\"]",
            &container,
            "containers workloads[0].container.network: gw: host network are forbidden in the regions it reaches\ncontainers workloads[0].container.capabilities: gw: capability NET_ADMIN is forbidden in the regions it reaches\ncontainers workloads[0].container.capabilities: gw: capability SYS_TIME is forbidden in the regions it reaches",
        ),
        (
            "[containers.allow]\nhost_network = true\ncapabilities = [\"net_admin\"]",
            &container,
            "containers workloads[0].container.capabilities: gw: capability SYS_TIME is forbidden in the regions it reaches",
        ),
        (
            "[rollout]\nrequired_above_devices = 10",
            &plain,
            "rollout.required_above_devices rollout: 40 devices placed: above 10, a change needs a [rollout] section",
        ),
        ("[rollout]\nrequired_above_devices = 40", &plain, ""),
        ("[rollout]\ncanary_required = true", &plain, ""),
        (
            "[rollout]\ncanary_required = true",
            &rolled,
            "rollout.canary_required rollout.waves[0]: the first wave must be a canary (\"canary:PERCENT\")",
        ),
        (
            "[rollout]\nmax_wave_size = 100",
            &rolled,
            "rollout.max_wave_size rollout.waves[1]: wave 2 would reach 120 devices at once; at most 100",
        ),
        (
            "[rollout]\nmax_wave_size = 30",
            &plain,
            "rollout.max_wave_size rollout: without a [rollout] this change reaches 40 devices at once; at most 30",
        ),
    ];
    for (policy, c, want) in cases {
        assert_eq!(denials(policy, c), want, "policy:\n{policy}");
    }
}

#[test]
fn bad_policy_files_are_refused() {
    for (text, want) in [
        ("[resources]\nmemory = { max = 1 }", "unknown field"),
        (
            "[[releases]]\nregions = []\nnames = [\"a\"]",
            "releases[0].regions",
        ),
        ("[[releases]]\nregions = [\"*\"]", "releases[0]: give names"),
        (
            "[[releases]]\nregions = [\"*\"]\nsigners = [\"abc\"]",
            "releases[0].signers",
        ),
        ("[rollout]\nmax_wave_size = -1", "max_wave_size"),
    ] {
        let err = Policy::parse("policy.toml", text)
            .expect_err(text)
            .to_string();
        assert!(
            err.starts_with("policy.toml: ") && err.contains(want),
            "{err}"
        );
    }
}

#[test]
fn a_bad_edit_keeps_the_previous_policy() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, "[resources]\nmemory_mib = { max = 32 }\n").expect("write");
    let mut f = file::PolicyFile::open(&path).expect("valid");
    assert_eq!(
        f.current()
            .resources
            .memory_mib
            .as_ref()
            .and_then(|b| b.max),
        Some(32)
    );
    std::fs::write(&path, "[resources]\nmemory_mib = { max = \"lots\" }\n").expect("write");
    assert_eq!(
        f.current()
            .resources
            .memory_mib
            .as_ref()
            .and_then(|b| b.max),
        Some(32)
    );
    assert!(f.error.is_some());
    std::fs::write(
        &path,
        "[resources]\nmemory_mib = { max = 128 }\n# longer now\n",
    )
    .expect("write");
    assert_eq!(
        f.current()
            .resources
            .memory_mib
            .as_ref()
            .and_then(|b| b.max),
        Some(128)
    );
    assert!(f.error.is_none());
}
