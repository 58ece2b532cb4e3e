//! Browser tests of the master's web UI: `agora dev --http` with running, finished, failed and
//! killed tasks, looked at through headless Chromium (Debian's `chromium`, driven over the
//! DevTools protocol) as a person would: the overview's agent and counts, the failed task's
//! reason and log tail, a running task's log growing on its open page, and a task killed
//! while its page is open turning `TASK_KILLED` in that same page, without a reload.
//! Screenshots of each page go to a folder the test prints (`$AGORA_UI_SCREENSHOTS`, or
//! `ui-screenshots` under Cargo's test tmp dir).
//!
//! Skipped, with the reason printed, where `/usr/bin/chromium` does not exist (`.ci/run`
//! installs it).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;

use common::dev::{poll, Dev, Proc, AGORA};
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Where the screenshots go (created, and printed).
fn screenshot_dir() -> PathBuf {
    let dir = std::env::var_os("AGORA_UI_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots"));
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    // Straight to the process's stderr: `eprintln!` is captured (and hidden) like `println!`.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("ui screenshots: {}\n", dir.display()).as_bytes(),
    );
    dir
}

fn shoot(tab: &Tab, dir: &Path, name: &str) {
    let png =
        tab.capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true).expect("screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
}

/// Evaluates `js` in the page; its value as a string (empty when it has none).
fn eval(tab: &Tab, js: &str) -> String {
    let v = tab.evaluate(js, false).unwrap_or_else(|e| panic!("evaluate `{js}`: {e}")).value;
    match v {
        Some(serde_json::Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// The page's text as a person reads it.
fn page_text(tab: &Tab) -> String {
    eval(tab, "document.body.innerText")
}

fn open(tab: &Tab, url: &str) {
    tab.navigate_to(url).expect("navigate").wait_until_navigated().expect("page loaded");
}

/// The task of this name in `agora tasks -o json`, once it is in `state`.
fn task_in(dev: &Dev, name: &str, state: &str) -> serde_json::Value {
    poll(&format!("task {name} in {state}"), 30, || {
        dev.tasks_json().into_iter().find(|t| t["name"] == name && t["state"] == state)
    })
}

/// `GET path` over HTTP/1.0: the response's head (status line and headers) and body.
fn get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to --http");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes()).expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    (head.to_string(), body.to_string())
}

fn task_url(http: &str, t: &serde_json::Value) -> String {
    format!(
        "http://{http}/tasks/{}?framework={}",
        t["id"].as_str().expect("id"),
        t["framework_id"].as_str().expect("framework id")
    )
}

fn launch() -> (Browser, tempfile::TempDir) {
    let profile = tempfile::tempdir().expect("profile dir");
    let args: Vec<&OsStr> =
        ["--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
            .iter()
            .map(OsStr::new)
            .collect();
    let options = LaunchOptions::default_builder()
        .path(Some(CHROMIUM.into()))
        .headless(true)
        // As root, Chromium runs only without its sandbox.
        .sandbox(false)
        .window_size(Some((1280, 900)))
        .user_data_dir(Some(profile.path().to_path_buf()))
        .args(args)
        .idle_browser_timeout(Duration::from_secs(120))
        .build()
        .expect("launch options");
    (Browser::new(options).expect("start chromium"), profile)
}

#[test]
fn the_ui_shows_tasks_as_a_person_sees_them_and_follows_a_kill_without_reload() {
    if !Path::new(CHROMIUM).exists() {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("skipped: the web UI's browser test needs Chromium at {CHROMIUM} (apt-get install chromium)\n")
                .as_bytes(),
        );
        return;
    }
    let shots = screenshot_dir();
    let mut dev = Dev::start_with(&[
        "--agents",
        "1",
        "--resources",
        "cpus:2;mem:1GiB;disk:1GiB",
        "--agent-attributes",
        "rack:r1;zone:<a>",
        "--http",
        "127.0.0.1:0",
    ]);
    let http = dev.stdout_line("HTTP: http://");
    let http = http.split('/').next().expect("address").to_string();

    // Finished and failed tasks (the failure with a reason and output; markup in them is text).
    let out = dev.agora(&["run", "--name", "tidy", "--", "echo", "all good"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = dev.agora(&[
        "run",
        "--name",
        "broken",
        "--shell",
        "--",
        "mkdir -p out && echo 'report <i>line</i>' > out/report.txt; echo 'failing <b>now</b>'; echo 'oops: the disk is on fire' >&2; exit 3",
    ]);
    assert!(!out.status.success(), "the failing task's run succeeded");
    // Running tasks, each under an `agora run` that stays until its task ends.
    let run = |name: &str, script: &str| {
        let mut cmd = Command::new(AGORA);
        cmd.env("AGORA_CONFIG", &dev.config).args(["run", "--name", name, "--shell", "--", script]);
        Proc::spawn(name, dev.dir.path(), &mut cmd)
    };
    let _steady = run("steady", "echo steady; sleep 600");
    let _victim =
        run("victim", "echo victim started; i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done");
    let failed = task_in(&dev, "broken", "TASK_FAILED");
    let victim = task_in(&dev, "victim", "TASK_RUNNING");
    task_in(&dev, "steady", "TASK_RUNNING");
    task_in(&dev, "tidy", "TASK_FINISHED");

    let (browser, _profile) = launch();
    let tab = browser.new_tab().expect("tab");
    tab.set_default_timeout(Duration::from_secs(20));

    // The overview: the agent, and the counts by state.
    open(&tab, &format!("http://{http}/"));
    let text = page_text(&tab);
    assert!(text.contains("agent-0"), "the overview does not list the agent:\n{text}");
    assert!(text.contains("Dominant share"), "no frameworks table:\n{text}");
    let count =
        |state: &str| eval(&tab, &format!("document.querySelector('[data-count=\"{state}\"]').textContent"));
    assert_eq!(count("TASK_FAILED"), "1", "{text}");
    assert_eq!(count("TASK_FINISHED"), "1", "{text}");
    assert_eq!(count("TASK_RUNNING"), "2", "{text}");
    assert_eq!(count("total"), "4", "{text}");
    shoot(&tab, &shots, "overview");

    // The failed task: its state, exit, reason, and the tail of both logs, escaped.
    open(&tab, &task_url(&http, &failed));
    let text = page_text(&tab);
    for want in ["TASK_FAILED", "exit 3", "command exited with status 3", "oops: the disk is on fire"] {
        assert!(text.contains(want), "the failed task's page lacks `{want}`:\n{text}");
    }
    let reason = failed["reason"].as_str().expect("reason");
    assert!(!reason.is_empty() && text.contains(reason), "no reason `{reason}` on the page:\n{text}");
    assert_eq!(eval(&tab, "document.getElementById('stdout').textContent"), "failing <b>now</b>\n");
    assert_eq!(eval(&tab, "document.querySelectorAll('pre b').length"), "0", "log text became markup");
    shoot(&tab, &shots, "task-failed");

    // Its sandbox, linked from its page: a directory opens its listing, a file shows as text
    // (markup in it stays text), and downloads as an attachment.
    let link = |text: &str| {
        eval(
            &tab,
            &format!(
                "Array.from(document.querySelectorAll('#sandbox a, table.files a')).find(a => a.textContent === '{text}')?.href ?? ''"
            ),
        )
    };
    let out_dir = link("out/");
    assert!(
        out_dir.contains("/files?") && out_dir.contains("path=out"),
        "no link to the sandbox's out/: {out_dir:?}"
    );
    let stdout_file = link("stdout");
    assert!(stdout_file.contains("/file?"), "no link to the sandbox's stdout: {stdout_file:?}");
    open(&tab, &out_dir);
    let text = page_text(&tab);
    assert!(text.contains("report.txt") && text.contains("B"), "the out/ listing:\n{text}");
    shoot(&tab, &shots, "task-sandbox");
    let report = link("report.txt");
    open(&tab, &report);
    assert_eq!(page_text(&tab).trim(), "report <i>line</i>", "the file's content as text");
    let download = report.replace(&format!("http://{http}"), "") + "&download=1";
    let (head, body) = get(&http, &download);
    assert!(
        head.to_ascii_lowercase().contains("content-disposition: attachment; filename=\"report.txt\""),
        "{head}"
    );
    assert_eq!(body, "report <i>line</i>\n");

    // The tasks list, filtered by state.
    open(&tab, &format!("http://{http}/tasks?state=TASK_FAILED"));
    let text = page_text(&tab);
    assert!(text.contains("broken") && !text.contains("tidy"), "the filter shows:\n{text}");
    open(&tab, &format!("http://{http}/tasks"));
    shoot(&tab, &shots, "tasks");

    // The agent: its attributes (escaped) and tasks.
    let agent = victim["agent_id"].as_str().expect("agent id");
    open(&tab, &format!("http://{http}/agents/{agent}"));
    let text = page_text(&tab);
    assert!(text.contains("zone") && text.contains("<a>"), "the agent page lacks its attributes:\n{text}");
    assert!(text.contains("victim") && text.contains("steady"), "the agent page lacks its tasks:\n{text}");
    shoot(&tab, &shots, "agent");

    // A running task's page follows its log, then sees the kill without a reload.
    open(&tab, &task_url(&http, &victim));
    eval(&tab, "window.agoraSamePage = 'yes'; 'ok'");
    let state = "document.querySelector('#task [data-field=\"state\"]').textContent";
    assert_eq!(eval(&tab, state), "TASK_RUNNING");
    // The log grows on the open page (followed, not reloaded).
    let log = "document.getElementById('stdout').textContent";
    let at_load = eval(&tab, log);
    assert!(at_load.starts_with("victim started\n"), "the running task's log tail: {at_load:?}");
    poll("the victim's log to grow on its open page", 20, || {
        let now = eval(&tab, log);
        (now.len() > at_load.len() + 20 && now.starts_with(&at_load)).then_some(())
    });
    shoot(&tab, &shots, "task-running");
    let out = dev.agora(&["kill", victim["id"].as_str().expect("id")]);
    assert!(out.status.success(), "agora kill: {}", String::from_utf8_lossy(&out.stderr));
    poll("the open page to show TASK_KILLED", 30, || (eval(&tab, state) == "TASK_KILLED").then_some(()));
    assert_eq!(eval(&tab, "window.agoraSamePage"), "yes", "the page was reloaded");
    shoot(&tab, &shots, "task-killed");

    // The overview's counts follow too: a second kill while it is open.
    open(&tab, &format!("http://{http}/"));
    eval(&tab, "window.agoraSamePage = 'yes'; 'ok'");
    assert_eq!(count("TASK_KILLED"), "1");
    let steady = task_in(&dev, "steady", "TASK_RUNNING");
    let out = dev.agora(&["kill", steady["id"].as_str().expect("id")]);
    assert!(out.status.success(), "agora kill: {}", String::from_utf8_lossy(&out.stderr));
    poll("the open overview to count 2 killed tasks", 30, || (count("TASK_KILLED") == "2").then_some(()));
    assert_eq!(count("TASK_RUNNING"), "0");
    assert_eq!(eval(&tab, "window.agoraSamePage"), "yes", "the overview was reloaded");
    shoot(&tab, &shots, "overview-after-kills");
    dev.stop();
}
