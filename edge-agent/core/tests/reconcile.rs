//! Data-driven tests for the reconciler: each case is a script of events; the trace of actions and observed states
//! is compared with an expected transcript (update with `UPDATE_EXPECT=1`).

use expect_test::{Expect, expect};
use flotilla_agent_core::{Action, DesiredWorkload, Exit, Reconciler};
use flotilla_shared::wire::{
    ContainerSpec, ExitCause, HealthRule, NetworkMode, Resources, RestartPolicy, UpdateStrategy,
    WorkloadKind, WorkloadSpec,
};
use flotilla_shared::{Digest, WorkloadName};
use std::fmt::Write;

fn spec(name: &str, version: u8, restart: RestartPolicy) -> WorkloadSpec {
    WorkloadSpec {
        name: WorkloadName::new(name).expect("valid"),
        kind: WorkloadKind::Wasm,
        release: Digest([version; 32]),
        config: vec![],
        resources: Resources {
            memory_mib: 8,
            cpu_ms: 10,
        },
        restart,
        health: HealthRule::RunningFor(1),
        tick_ms: 0,
        geofence: None,
        secrets: vec![],
        container: None,
    }
}

/// A container with update strategy `strategy` (the other fields do not matter to the reconciler).
fn container(strategy: UpdateStrategy) -> Box<ContainerSpec> {
    Box::new(ContainerSpec {
        command: vec![],
        env: vec![],
        config_path: "/etc/flotilla/config".into(),
        cpus_milli: 0,
        pids: 256,
        ports: vec![],
        volumes: vec![],
        devices: vec![],
        capabilities: vec![],
        network: NetworkMode::Bridge,
        read_only: true,
        user: None,
        health: None,
        stop_timeout_secs: 10,
        update_strategy: strategy,
        log_max_bytes: 10 << 20,
    })
}

/// Parses `name@version[:ready|:downloading][:out][:never|:always][:ctr|:killfirst|:deletefirst]` into a desired
/// workload (the last flags make it a container with that update strategy).
fn desired(item: &str) -> DesiredWorkload {
    let mut parts = item.split(':');
    let head = parts.next().expect("item");
    let (name, version) = head.split_once('@').expect("name@version");
    let version: u8 = version.parse().expect("version");
    let flags: Vec<&str> = parts.collect();
    let restart = if flags.contains(&"never") {
        RestartPolicy::Never
    } else if flags.contains(&"always") {
        RestartPolicy::Always
    } else {
        RestartPolicy::OnFailure
    };
    let mut spec = spec(name, version, restart);
    for (flag, strategy) in [
        ("ctr", UpdateStrategy::DownloadThenKill),
        ("killfirst", UpdateStrategy::KillThenDownload),
        ("deletefirst", UpdateStrategy::DeleteThenDownload),
    ] {
        if flags.contains(&flag) {
            spec.kind = WorkloadKind::Container;
            spec.container = Some(container(strategy));
        }
    }
    DesiredWorkload {
        spec,
        artifact: (!flags.contains(&"downloading")).then_some(Digest([version + 100; 32])),
        inside_fence: !flags.contains(&"out"),
        rejected: None,
    }
}

/// Runs a script. Lines: `at MS`, `desire ITEMS..`, `ok NAME` / `err NAME MSG` (finish the in-flight op),
/// `loading NAME` (the in-flight start loads its image), `exit NAME` / `crash NAME MSG` / `oom NAME` (the
/// running instance ends), `timeout`.
fn check(script: &str, expect: Expect) {
    let mut r = Reconciler::new();
    let mut now = 0;
    let mut in_flight: std::collections::BTreeMap<String, u64> = Default::default();
    let mut running_op: std::collections::BTreeMap<String, u64> = Default::default();
    let mut out = String::new();
    for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let name = || WorkloadName::new(words[1]).expect("name");
        match words[0] {
            "at" => now = words[1].parse().expect("ms"),
            "desire" => r.set_desired(now, words[1..].iter().map(|w| desired(w)).collect()),
            "ok" => {
                let op = in_flight.remove(words[1]).expect("op in flight");
                r.op_finished(now, &name(), op, Ok(()));
            }
            "err" => {
                let op = in_flight.remove(words[1]).expect("op in flight");
                r.op_finished(now, &name(), op, Err(words[2..].join(" ")));
            }
            "exit" => r.exited(now, &name(), running_op[words[1]], Exit::Completed),
            "crash" => r.exited(
                now,
                &name(),
                running_op[words[1]],
                Exit::Failed(words[2..].join(" ")),
            ),
            "stale" => r.op_finished(now, &name(), 999, Ok(())),
            "loading" => r.loading(&name(), in_flight[words[1]]),
            "oom" => r.exited(
                now,
                &name(),
                running_op[words[1]],
                Exit::Ended(ExitCause::OomKilled { limit_mib: 8 }),
            ),
            "timeout" => r.handle_timeout(now),
            other => panic!("unknown step {other}"),
        }
        write!(out, "{line:<28} |").expect("write");
        while let Some(a) = r.poll_action() {
            match a {
                Action::Start { name, op, spec, .. } => {
                    write!(out, " start {name}@{}", spec.release.0[0]).expect("write");
                    in_flight.insert(name.to_string(), op);
                    running_op.insert(name.to_string(), op);
                }
                Action::Stop { name, op } => {
                    write!(out, " stop {name}").expect("write");
                    in_flight.insert(name.to_string(), op);
                }
            }
        }
        write!(out, " ||").expect("write");
        for s in r.status(now) {
            write!(out, " {}={:?}", s.name, s.state).expect("write");
            if s.restarts > 0 {
                write!(out, "/r{}", s.restarts).expect("write");
            }
            if let Some(e) = s.exit {
                write!(out, "/{e:?}").expect("write");
            }
            if let Some(ms) = s.retry_in_ms {
                write!(out, "/retry in {ms}").expect("write");
            }
        }
        if let Some(t) = r.poll_timeout() {
            write!(out, " (wake {t})").expect("write");
        }
        out.push('\n');
    }
    expect.assert_eq(&out);
}

/// A new workload starts once; re-applying the same desired state starts nothing (quiet reconnect).
#[test]
fn start_and_idempotent_reapply() {
    check(
        "desire a@1 b@1
         ok a
         ok b
         desire a@1 b@1
         desire b@1 a@1",
        expect![[r#"
            desire a@1 b@1               | start a@1 start b@1 || a=Starting b=Starting
            ok a                         | || a=Running b=Starting (wake 1000)
            ok b                         | || a=Running b=Running (wake 1000)
            desire a@1 b@1               | || a=Running b=Running (wake 1000)
            desire b@1 a@1               | || a=Running b=Running (wake 1000)
        "#]],
    );
}

/// A new version waits for its artifact while the old one keeps running, then replaces it (stop, then start).
#[test]
fn upgrade_waits_for_artifact() {
    check(
        "desire a@1
         ok a
         desire a@2:downloading
         desire a@2
         ok a
         ok a",
        expect![[r#"
            desire a@1                   | start a@1 || a=Starting
            ok a                         | || a=Running (wake 1000)
            desire a@2:downloading       | || a=Running (wake 1000)
            desire a@2                   | stop a || a=Starting
            ok a                         | start a@2 || a=Starting
            ok a                         | || a=Running (wake 1000)
        "#]],
    );
}

/// Container update strategies: download-then-kill keeps the old version until the new image is there;
/// kill- and delete-then-download stop it at once, start the new one when it arrives, and a spec change that
/// needs no download replaces in place like any other.
#[test]
fn update_strategies() {
    check(
        "desire a@1:ctr b@1:killfirst c@1:deletefirst
         ok a
         ok b
         ok c
         desire a@2:downloading:ctr b@2:downloading:killfirst c@2:downloading:deletefirst
         ok b
         ok c
         desire a@2:ctr b@2:killfirst c@2:deletefirst
         ok a
         ok a
         ok b
         ok c",
        expect![[r#"
            desire a@1:ctr b@1:killfirst c@1:deletefirst | start a@1 start b@1 start c@1 || a=Starting b=Starting c=Starting
            ok a                         | || a=Running b=Starting c=Starting (wake 1000)
            ok b                         | || a=Running b=Running c=Starting (wake 1000)
            ok c                         | || a=Running b=Running c=Running (wake 1000)
            desire a@2:downloading:ctr b@2:downloading:killfirst c@2:downloading:deletefirst | stop b stop c || a=Running b=Downloading c=Downloading (wake 1000)
            ok b                         | || a=Running b=Downloading c=Downloading (wake 1000)
            ok c                         | || a=Running b=Downloading c=Downloading (wake 1000)
            desire a@2:ctr b@2:killfirst c@2:deletefirst | stop a start b@2 start c@2 || a=Starting b=Starting c=Starting
            ok a                         | start a@2 || a=Starting b=Starting c=Starting
            ok a                         | || a=Running b=Starting c=Starting (wake 1000)
            ok b                         | || a=Running b=Running c=Starting (wake 1000)
            ok c                         | || a=Running b=Running c=Running (wake 1000)
        "#]],
    );
}

/// A container start shows `Loading` while its image loads; an OOM kill is a typed exit cause, shown with the
/// time to the next start; a clean start clears neither the restart count nor (until it ran) the cause.
#[test]
fn loading_and_exit_causes() {
    check(
        "desire a@1:ctr
         loading a
         ok a
         at 100
         oom a
         at 400
         timeout
         at 600
         timeout
         loading a
         ok a
         at 700
         exit a",
        expect![[r#"
            desire a@1:ctr               | start a@1 || a=Starting
            loading a                    | || a=Loading
            ok a                         | || a=Running (wake 1000)
            at 100                       | || a=Running (wake 1000)
            oom a                        | || a=BackingOff/OomKilled { limit_mib: 8 }/retry in 500 (wake 600)
            at 400                       | || a=BackingOff/OomKilled { limit_mib: 8 }/retry in 200 (wake 600)
            timeout                      | || a=BackingOff/OomKilled { limit_mib: 8 }/retry in 200 (wake 600)
            at 600                       | || a=BackingOff/OomKilled { limit_mib: 8 }/retry in 0 (wake 600)
            timeout                      | start a@1 || a=Starting/r1/OomKilled { limit_mib: 8 }
            loading a                    | || a=Loading/r1/OomKilled { limit_mib: 8 }
            ok a                         | || a=Running/r1/OomKilled { limit_mib: 8 } (wake 1600)
            at 700                       | || a=Running/r1/OomKilled { limit_mib: 8 } (wake 1600)
            exit a                       | || a=Exited/r1
        "#]],
    );
}

/// Crashes back off exponentially; a start error counts as a failure too; the backoff timer drives the restart.
#[test]
fn crash_backoff() {
    check(
        "desire a@1
         ok a
         at 100
         crash a trap: unreachable
         at 300
         timeout
         at 600
         timeout
         err a out of memory
         at 1600
         timeout
         ok a
         at 40000
         timeout",
        expect![[r#"
            desire a@1                   | start a@1 || a=Starting
            ok a                         | || a=Running (wake 1000)
            at 100                       | || a=Running (wake 1000)
            crash a trap: unreachable    | || a=BackingOff/retry in 500 (wake 600)
            at 300                       | || a=BackingOff/retry in 300 (wake 600)
            timeout                      | || a=BackingOff/retry in 300 (wake 600)
            at 600                       | || a=BackingOff/retry in 0 (wake 600)
            timeout                      | start a@1 || a=Starting/r1
            err a out of memory          | || a=BackingOff/r1/retry in 1000 (wake 1600)
            at 1600                      | || a=BackingOff/r1/retry in 0 (wake 1600)
            timeout                      | start a@1 || a=Starting/r2
            ok a                         | || a=Running/r2 (wake 2600)
            at 40000                     | || a=Running/r2 (wake 2600)
            timeout                      | || a=Running/r2
        "#]],
    );
}

/// Restart policy Never leaves a crashed workload failed; a command that completes under OnFailure stays exited,
/// under Always it starts again.
#[test]
fn restart_policies() {
    check(
        "desire a@1:never b@1 c@1:always
         ok a
         ok b
         ok c
         crash a boom
         exit b
         exit c
         ok c
         timeout",
        expect![[r#"
            desire a@1:never b@1 c@1:always | start a@1 start b@1 start c@1 || a=Starting b=Starting c=Starting
            ok a                         | || a=Running b=Starting c=Starting (wake 1000)
            ok b                         | || a=Running b=Running c=Starting (wake 1000)
            ok c                         | || a=Running b=Running c=Running (wake 1000)
            crash a boom                 | || a=Failed b=Running c=Running (wake 1000)
            exit b                       | || a=Failed b=Exited c=Running (wake 1000)
            exit c                       | start c@1 || a=Failed b=Exited c=Starting/r1
            ok c                         | || a=Failed b=Exited c=Running/r1 (wake 1000)
            timeout                      | || a=Failed b=Exited c=Running/r1 (wake 1000)
        "#]],
    );
}

/// Leaving the geofence stops the workload and holds it; re-entering starts it again.
#[test]
fn geofence_hold() {
    check(
        "desire a@1
         ok a
         desire a@1:out
         ok a
         desire a@1
         ok a",
        expect![[r#"
            desire a@1                   | start a@1 || a=Starting
            ok a                         | || a=Running (wake 1000)
            desire a@1:out               | stop a || a=HeldByGeofence
            ok a                         | || a=HeldByGeofence
            desire a@1                   | start a@1 || a=Starting
            ok a                         | || a=Running (wake 1000)
        "#]],
    );
}

/// Removing a workload stops it and then forgets it; a stale result for a superseded op is ignored.
#[test]
fn removal_and_stale_results() {
    check(
        "desire a@1 b@1
         ok a
         stale a
         desire b@1
         ok a
         ok b",
        expect![[r#"
            desire a@1 b@1               | start a@1 start b@1 || a=Starting b=Starting
            ok a                         | || a=Running b=Starting (wake 1000)
            stale a                      | || a=Running b=Starting (wake 1000)
            desire b@1                   | stop a || b=Starting
            ok a                         | || b=Starting
            ok b                         | || b=Running (wake 1000)
        "#]],
    );
}

/// A newer desired state while a start is in flight waits for the op (one op per workload), then replaces it.
#[test]
fn one_op_in_flight() {
    check(
        "desire a@1
         desire a@2
         ok a
         ok a
         ok a",
        expect![[r#"
            desire a@1                   | start a@1 || a=Starting
            desire a@2                   | || a=Starting
            ok a                         | stop a || a=Starting
            ok a                         | start a@2 || a=Starting
            ok a                         | || a=Running (wake 1000)
        "#]],
    );
}
