//! The operator console in a real browser (Debian's Chromium through chromedriver) against a real hub with real
//! agents: log-in, the map of the fleet, a rollout started from the console and watched live, its commands, the
//! viewer's and a region-scoped operator's limits, CSRF, log-out. Screenshots go to `target/console-screenshots/`.

use fantoccini::{Client, Locator};
use flotilla_fleet_tests::browser::{Driver, raw_http, screenshot, text, until};
use flotilla_fleet_tests::{AgentSpec, FleetBuilder, Hub, firmware};
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(60);

fn spec(name: &str, regions: &str, version: &str, plan: &str) -> String {
    format!(
        "name = \"{name}\"\n[target]\nselector = {{ role = \"gateway\" }}\nregions = [{regions}]\n\
         [[workloads]]\nname = \"{name}\"\nrelease = \"{name}@{version}\"\ntick_ms = 100\nmemory_mib = 4\n\
         cpu_ms = 20\nhealth_secs = 1\n{plan}"
    )
}

/// Canary first, then an approval, then the rest.
const PLAN: &str = "[rollout]\nwaves = [\"canary:34\", \"rest\"]\nsoak_secs = 1\nreport_timeout_secs = 60\nmanual_approval = true\n";

fn admin_token(hub: &Hub) -> String {
    std::fs::read_to_string(hub.dir.join("admin.token"))
        .expect("admin token")
        .trim()
        .to_owned()
}

fn token(hub: &Hub, name: &str, role: &str, regions: Option<&str>) -> String {
    let mut args = vec!["token", "--name", name, "--role", role];
    if let Some(r) = regions {
        args.extend(["--regions", r]);
    }
    hub.cli(&args).expect("token").trim().to_owned()
}

/// Logs in through the form, as an operator would.
async fn log_in(c: &Client, base: &str, token: &str) -> anyhow::Result<()> {
    c.goto(&format!("{base}/login")).await?;
    c.find(Locator::Css("input[name=token]"))
        .await?
        .send_keys(token)
        .await?;
    c.find(Locator::Css("form button[type=submit]"))
        .await?
        .click()
        .await?;
    until("the overview after log-in", PATIENCE, || async {
        (text(c, "h1").await.as_deref() == Some("Fleet overview")).then_some(())
    })
    .await
}

/// The session cookie's value in the browser (HttpOnly: scripts cannot read it, WebDriver can).
async fn session_cookie(c: &Client) -> String {
    let v = c
        .get_named_cookie("flotilla_session")
        .await
        .expect("session cookie");
    format!("flotilla_session={}", v.value())
}

/// The CSRF token of the page's log-out form.
async fn csrf(c: &Client) -> String {
    c.find(Locator::Css("form[action=\"/logout\"] input[name=csrf]"))
        .await
        .expect("log-out form")
        .attr("value")
        .await
        .expect("attr")
        .expect("csrf value")
}

async fn wave_count(c: &Client, wave: usize, class: &str) -> Option<usize> {
    text(c, &format!("tr.wave[data-wave=\"{wave}\"] td.{class}"))
        .await?
        .trim()
        .parse()
        .ok()
}

/// Whether every device of the wave shows healthy.
async fn wave_healthy(c: &Client, wave: usize) -> bool {
    let total = text(c, &format!("tr.wave[data-wave=\"{wave}\"] td:nth-child(2)")).await;
    let Some(total) = total.and_then(|t| t.trim().parse::<usize>().ok()) else {
        return false;
    };
    total > 0 && wave_count(c, wave, "healthy").await == Some(total)
}

/// An admin logs in, sees the regions of the fleet on the map, starts a rollout by applying a spec in the
/// console, watches its waves progress live (no reload: the page's heading element survives), pauses, resumes,
/// approves with a remark, aborts a second rollout, and logs out.
#[test]
fn console_shows_the_fleet_and_drives_a_live_rollout() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("eu-1", "eu-west", 53.35, -6.26))
        .agent(AgentSpec::new("eu-2", "eu-west", 48.86, 2.35))
        .agent(AgentSpec::new("us-1", "us-east", 40.71, -74.0))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    for v in ["1.0.0", "2.0.0", "3.0.0"] {
        hub.push_release("sensor", v, 1, &firmware("sensor"))
            .expect("release");
    }
    let both = "\"eu-west\", \"us-east\"";
    hub.apply(&spec("sensor", both, "1.0.0", ""))
        .expect("apply");
    for d in ["eu-1", "eu-2", "us-1"] {
        hub.wait_workload(d, "sensor", "running").expect("running");
    }
    let base = hub.api.clone();
    let admin = admin_token(hub);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let driver = Driver::start().expect("chromedriver");
        let c = driver.session().await.expect("browser");
        log_in(&c, &base, &admin).await.expect("log in");

        // The map shows both regions, aggregated on the server.
        for region in ["eu-west", "us-east"] {
            c.find(Locator::Css(&format!(
                "svg.map circle[data-region=\"{region}\"]"
            )))
            .await
            .unwrap_or_else(|e| panic!("no marker for {region}: {e}"));
        }
        let eu = text(&c, "tr.region[data-region=\"eu-west\"]")
            .await
            .expect("eu-west row");
        let cells: Vec<&str> = eu.split_whitespace().take(3).collect();
        assert_eq!(
            cells,
            ["eu-west", "2", "2"],
            "eu-west: 2 devices, 2 online: {eu}"
        );
        assert!(
            !c.source().await.expect("source").contains(&admin),
            "the token is never in a page"
        );
        let shot = screenshot(&c, "fleet-overview").await.expect("screenshot");
        eprintln!("screenshot: {}", shot.display());

        // A spec with a mistake: the API's refusal shown inline, the text kept for fixing.
        c.goto(&format!("{base}/deployments"))
            .await
            .expect("deployments");
        let broken = spec("sensor", both, "2.0.0", "").replace("tick_ms", "tick_msec");
        c.find(Locator::Css("textarea[name=spec]"))
            .await
            .expect("spec box")
            .send_keys(&broken)
            .await
            .expect("type");
        c.find(Locator::Css("form.apply button[type=submit]"))
            .await
            .expect("apply")
            .click()
            .await
            .expect("click");
        let refusal = until("the refusal", PATIENCE, || async {
            text(&c, "pre.error").await
        })
        .await
        .expect("refused");
        assert!(
            refusal.contains("tick_msec"),
            "the refusal names the field: {refusal}"
        );
        let kept = c
            .find(Locator::Css("textarea[name=spec]"))
            .await
            .expect("box")
            .prop("value")
            .await
            .expect("value");
        assert_eq!(
            kept.as_deref(),
            Some(broken.as_str()),
            "the spec is kept for fixing"
        );

        // Start a rollout from the console: paste the spec, apply.
        c.goto(&format!("{base}/deployments"))
            .await
            .expect("deployments");
        c.find(Locator::Css("textarea[name=spec]"))
            .await
            .expect("spec box")
            .send_keys(&spec("sensor", both, "2.0.0", PLAN))
            .await
            .expect("type spec");
        c.find(Locator::Css("form.apply button[type=submit]"))
            .await
            .expect("apply")
            .click()
            .await
            .expect("click");
        let applied = until("the apply's outcome", PATIENCE, || async {
            text(&c, "p.ok").await
        })
        .await
        .expect("applied");
        assert!(
            applied.starts_with("Applied sensor as revision 2"),
            "{applied}"
        );

        // The canary wave, watched live on the rollout page, then the wait for approval.
        c.goto(&format!("{base}/rollouts/sensor"))
            .await
            .expect("rollout page");
        let heading = c.find(Locator::Css("h1")).await.expect("heading");
        until(
            "the canary healthy and the rollout awaiting approval",
            PATIENCE,
            || async {
                let phase = text(&c, "dd.phase").await?;
                (wave_healthy(&c, 1).await && phase.starts_with("awaiting approval")).then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| {
            let api = hub
                .client
                .get("/api/v1/rollouts/sensor")
                .map(|v| v.to_string())
                .unwrap_or_default();
            panic!("{e}\nAPI: {api}")
        });
        eprintln!(
            "page: {:?} / {:?}",
            text(&c, "dd.phase").await,
            text(&c, "#rollout-waves").await
        );
        // The Approve button arrives with the phase, in place.
        until("the Approve button", PATIENCE, || async {
            c.find(Locator::Css("button.btn-approve")).await.ok()
        })
        .await
        .expect("approve offered live");
        heading
            .text()
            .await
            .expect("the page was updated in place, not reloaded");
        let shot = screenshot(&c, "rollout-in-progress")
            .await
            .expect("screenshot");
        eprintln!("screenshot: {}", shot.display());

        // Pause and resume (form posts, back to the page).
        c.find(Locator::Css("button.btn-pause"))
            .await
            .expect("pause")
            .click()
            .await
            .expect("click");
        until("paused", PATIENCE, || async {
            text(&c, "dd.phase").await.filter(|p| p.contains("paused"))
        })
        .await
        .expect("paused");
        c.find(Locator::Css("button.btn-resume"))
            .await
            .expect("resume")
            .click()
            .await
            .expect("click");
        until("resumed", PATIENCE, || async {
            text(&c, "dd.phase")
                .await
                .filter(|p| !p.contains("paused") && p.starts_with("awaiting approval"))
        })
        .await
        .expect("resumed");

        // Approve with a remark; the second wave's progress arrives without a reload.
        c.find(Locator::Css("input[name=remark]"))
            .await
            .expect("remark")
            .send_keys("canary clean")
            .await
            .expect("type");
        c.find(Locator::Css("button.btn-approve"))
            .await
            .expect("approve")
            .click()
            .await
            .expect("click");
        until("the approved page", PATIENCE, || async {
            text(&c, "dd.phase")
                .await
                .filter(|p| !p.starts_with("awaiting"))
        })
        .await
        .expect("approved");
        let heading = c.find(Locator::Css("h1")).await.expect("heading");
        let at_load = wave_count(&c, 2, "healthy").await.unwrap_or(0);
        until("wave 2 healthy", PATIENCE, || async {
            wave_healthy(&c, 2).await.then_some(())
        })
        .await
        .expect("wave 2 progress");
        heading
            .text()
            .await
            .expect("wave 2's progress arrived without a reload");
        eprintln!("wave 2 healthy at page load: {at_load}, then all of it live");
        until("completed", PATIENCE, || async {
            text(&c, "dd.phase").await.filter(|p| p == "completed")
        })
        .await
        .expect("completed");
        let history = text(&c, "ol.history").await.unwrap_or_default();
        assert!(
            history.contains("canary clean"),
            "the remark is in the history: {history}"
        );

        // A second rollout, aborted after its canary: the plain sentence is beside the button.
        hub.apply(&spec("sensor", both, "3.0.0", PLAN))
            .expect("third version");
        c.goto(&format!("{base}/rollouts/sensor"))
            .await
            .expect("rollout page");
        until("awaiting approval", PATIENCE, || async {
            text(&c, "dd.phase")
                .await
                .filter(|p| p.starts_with("awaiting approval"))
        })
        .await
        .expect("canary of the third version");
        let note = text(&c, "p.abort-note").await.expect("abort explained");
        assert!(note.contains("rolled back"), "{note}");
        c.find(Locator::Css("button.btn-abort"))
            .await
            .expect("abort")
            .click()
            .await
            .expect("click");
        until("aborted", PATIENCE, || async {
            text(&c, "dd.phase")
                .await
                .filter(|p| p.starts_with("aborted"))
        })
        .await
        .expect("aborted");
        assert!(
            c.find(Locator::Css("button.btn-approve")).await.is_err(),
            "no actions on a finished rollout"
        );

        // The device list filtered by region (as the map's links do), and a device's page.
        c.goto(&format!("{base}/devices?region=eu-west"))
            .await
            .expect("devices");
        let list = text(&c, "table.devices tbody").await.unwrap_or_default();
        assert!(
            list.contains("eu-1") && list.contains("eu-2") && !list.contains("us-1"),
            "{list}"
        );
        c.goto(&format!("{base}/devices/eu-1"))
            .await
            .expect("device");
        let why = text(&c, "table.workloads td.why").await.unwrap_or_default();
        assert!(!why.is_empty(), "the why sentence of the workload");
        let reports = text(&c, "table.reports").await.unwrap_or_default();
        assert!(reports.contains("running"), "recent reports: {reports}");
        let shot = screenshot(&c, "device").await.expect("screenshot");
        eprintln!("screenshot: {}", shot.display());

        // Log out: the session ends, in the browser and for anyone replaying its cookie.
        let cookie = session_cookie(&c).await;
        c.find(Locator::Css("form[action=\"/logout\"] button"))
            .await
            .expect("log out")
            .click()
            .await
            .expect("click");
        until("the log-in page", PATIENCE, || async {
            c.current_url().await.ok().filter(|u| u.path() == "/login")
        })
        .await
        .expect("logged out");
        c.goto(&format!("{base}/")).await.expect("overview");
        assert_eq!(
            c.current_url().await.expect("url").path(),
            "/login",
            "logged out"
        );
        let (status, head) = raw_http(&base, "GET", "/", Some(&cookie), "").expect("replay");
        assert!(
            status == 303 && head.contains("location: /login"),
            "a replayed cookie after log-out: {status}\n{head}"
        );
        c.close().await.expect("close");
    });
}

/// A viewer sees no action buttons and its forged POST is refused by the API's role check; a form without the
/// CSRF token is refused even for an operator; an eu-west operator sees and acts only in eu-west.
#[test]
fn console_enforces_roles_regions_and_csrf() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("eu-1", "eu-west", 53.35, -6.26))
        .agent(AgentSpec::new("us-1", "us-east", 40.71, -74.0))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    for name in ["eu", "both"] {
        for v in ["1.0.0", "2.0.0"] {
            hub.push_release(name, v, 1, &firmware("sensor"))
                .expect("release");
        }
    }
    let both = "\"eu-west\", \"us-east\"";
    hub.apply(&spec("eu", "\"eu-west\"", "1.0.0", ""))
        .expect("apply");
    hub.apply(&spec("both", both, "1.0.0", "")).expect("apply");
    hub.wait_workload("eu-1", "eu", "running").expect("running");
    hub.wait_workload("us-1", "both", "running")
        .expect("running");
    // One wave that soaks for ten minutes: the rollouts stay in progress for the whole test.
    let plan = "[rollout]\nwaves = [\"rest\"]\nsoak_secs = 600\n";
    hub.apply(&spec("eu", "\"eu-west\"", "2.0.0", plan))
        .expect("eu rollout");
    hub.apply(&spec("both", both, "2.0.0", plan))
        .expect("both rollout");
    let viewer = token(hub, "watcher", "viewer", None);
    let ops_eu = token(hub, "ops-eu", "operator", Some("eu-west"));
    let base = hub.api.clone();
    let paused = |name: &str| -> bool {
        hub.client
            .get(&format!("/api/v1/rollouts/{name}"))
            .expect("status")["paused"]
            .as_bool()
            .unwrap_or(false)
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let driver = Driver::start().expect("chromedriver");

        // The viewer: the rollout without buttons; a forged POST with its valid CSRF token refused by its role.
        let v = driver.session().await.expect("browser");
        log_in(&v, &base, &viewer).await.expect("log in");
        v.goto(&format!("{base}/rollouts/eu"))
            .await
            .expect("rollout");
        assert!(text(&v, "h2").await.is_some());
        for b in ["pause", "resume", "approve", "abort"] {
            assert!(
                v.find(Locator::Css(&format!("button.btn-{b}")))
                    .await
                    .is_err(),
                "viewer sees {b}"
            );
        }
        let form = format!("csrf={}", csrf(&v).await);
        let (status, body) = raw_http(
            &base,
            "POST",
            "/rollouts/eu/pause",
            Some(&session_cookie(&v).await),
            &form,
        )
        .expect("forged");
        assert_eq!(status, 403, "{body}");
        assert!(
            body.contains("needs Operator"),
            "the API's reason is shown: {body}"
        );
        assert!(!paused("eu"), "the viewer's forged POST changed nothing");

        // The eu-west operator: only eu-west on the map and in the list; us-east refused with the reason.
        let o = driver.session().await.expect("browser");
        log_in(&o, &base, &ops_eu).await.expect("log in");
        assert!(
            o.find(Locator::Css("svg.map circle[data-region=\"eu-west\"]"))
                .await
                .is_ok()
        );
        assert!(
            o.find(Locator::Css("svg.map circle[data-region=\"us-east\"]"))
                .await
                .is_err(),
            "us-east on eu's map"
        );
        o.goto(&format!("{base}/devices")).await.expect("devices");
        let list = text(&o, "table.devices tbody").await.unwrap_or_default();
        assert!(list.contains("eu-1") && !list.contains("us-1"), "{list}");
        o.goto(&format!("{base}/devices/us-1"))
            .await
            .expect("device");
        let refusal = text(&o, "p.error").await.expect("refusal");
        assert!(
            refusal.starts_with("403") && refusal.contains("us-east"),
            "{refusal}"
        );
        o.goto(&format!("{base}/rollouts/both"))
            .await
            .expect("rollout");
        let refusal = text(&o, "p.error").await.expect("refusal");
        assert!(
            refusal.starts_with("403") && refusal.contains("us-east"),
            "{refusal}"
        );
        let (status, _) = raw_http(
            &base,
            "POST",
            "/rollouts/both/pause",
            Some(&session_cookie(&o).await),
            &format!("csrf={}", csrf(&o).await),
        )
        .expect("post");
        assert_eq!(
            status, 403,
            "a rollout reaching us-east cannot be commanded from eu-west"
        );
        assert!(!paused("both"));

        // With JavaScript off, the same operator's buttons are plain forms that work.
        let nojs = driver
            .session_with(false)
            .await
            .expect("browser without JavaScript");
        log_in(&nojs, &base, &ops_eu)
            .await
            .expect("log in without JavaScript");
        nojs.goto(&format!("{base}/rollouts/eu"))
            .await
            .expect("rollout");
        nojs.find(Locator::Css("button.btn-pause"))
            .await
            .expect("pause")
            .click()
            .await
            .expect("click");
        until("paused without JavaScript", PATIENCE, || async {
            paused("eu").then_some(())
        })
        .await
        .expect("paused");
        nojs.find(Locator::Css("button.btn-resume"))
            .await
            .expect("resume")
            .click()
            .await
            .expect("click");
        until("resumed without JavaScript", PATIENCE, || async {
            (!paused("eu")).then_some(())
        })
        .await
        .expect("resumed");
        nojs.close().await.expect("close");

        // CSRF: the operator's own session, without the token, is refused; with it, the same POST works.
        let cookie = session_cookie(&o).await;
        let (status, body) =
            raw_http(&base, "POST", "/rollouts/eu/pause", Some(&cookie), "").expect("csrf-less");
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("CSRF"), "{body}");
        assert!(!paused("eu"), "a CSRF-less POST changed nothing");
        let (status, _) = raw_http(
            &base,
            "POST",
            "/rollouts/eu/pause",
            Some(&cookie),
            &format!("csrf={}", csrf(&o).await),
        )
        .expect("post");
        assert_eq!(status, 303);
        assert!(paused("eu"), "the same POST with the CSRF token pauses");

        // Every refusal above is in the audit log, as the admin's console shows it.
        let a = driver.session().await.expect("browser");
        log_in(&a, &base, &admin_token(hub)).await.expect("log in");
        a.goto(&format!("{base}/audit?action=denied"))
            .await
            .expect("audit");
        let audit = text(&a, "table.audit tbody").await.unwrap_or_default();
        for needle in ["watcher", "ops-eu", "CSRF", "us-east"] {
            assert!(audit.contains(needle), "audit lacks {needle}: {audit}");
        }
        for c in [v, o, a] {
            c.close().await.expect("close");
        }
    });
}
