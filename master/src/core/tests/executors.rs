//! Frameworks' own executors: their resources, validation, messages, shutdown.

use super::*;

pub(super) fn executor_info(id: &str, r: &str) -> ExecutorInfo {
    ExecutorInfo {
        executor_id: ExecutorId::new(id),
        name: format!("executor {id}"),
        command: CommandInfo { argv: vec!["./exec".into()], shell: false, env: vec![] },
        resources: res(r),
        fetch: vec![FetchInfo {
            artifact: ArtifactRef { digest: Digest::of(b"#!/bin/sh\n"), size: 10 },
            path: "exec".into(),
            executable: true,
        }],
    }
}

pub(super) fn exec_task(id: &str, r: &str, executor: &ExecutorInfo) -> TaskInfo {
    TaskInfo {
        kind: TaskKind::Executor(Box::new(ExecutorTask {
            executor: executor.clone(),
            data: b"job".to_vec(),
        })),
        ..task(id, r)
    }
}

impl Harness {
    /// A harness whose artifact store holds the executors' binary.
    pub(super) fn with_executor_binary() -> Self {
        let mut h = Harness::new();
        h.m.artifact_stored(Digest::of(b"#!/bin/sh\n"));
        h
    }

    pub(super) fn finish(&mut self, s: &Setup, tid: &str) {
        let (uuid, _) = self.status(s.ac, &s.fw, &s.agent, tid, TaskState::Finished);
        self.call(
            s.fc,
            SchedulerCall::Acknowledge { agent_id: s.agent.clone(), task_id: TaskId::new(tid), uuid },
        );
    }

    /// Subscribes a framework and registers an agent; returns them and the first offer.
    pub(super) fn offered(&mut self, agent_res: &str) -> (Setup, Offer) {
        let (fc, fw) = self.subscribe("alice", SEC);
        let (ac, agent) = self.add_agent(agent_res);
        let offer = single_offer(&self.advance(5 * MS), fc);
        (Setup { fc, fw, ac, agent }, offer)
    }
}

#[test]
fn executor_resources_are_taken_once_per_agent_and_freed_when_it_exits() {
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:4;mem:4GiB");
    let e = executor_info("e1", "cpus:0.5;mem:512MiB");
    let acts = h.call(
        s.fc,
        accept(
            &offer,
            vec![exec_task("t1", "cpus:1;mem:1GiB", &e), exec_task("t2", "cpus:1;mem:1GiB", &e)],
            None,
        ),
    );
    assert!(updates(&acts, s.fc).is_empty(), "{acts:#?}");
    let launched = run_tasks(&acts, s.ac);
    assert_eq!(launched.iter().map(|t| t.task_id.as_str()).collect::<Vec<_>>(), ["t1", "t2"]);
    assert_eq!(h.m.executors.len(), 1);
    assert_eq!(h.m.agents()[0].used, res("cpus:2.5;mem:2.5GiB"));
    assert_eq!(h.m.frameworks()[0].used, res("cpus:2.5;mem:2.5GiB"));
    let views = h.m.tasks();
    assert!(views.iter().all(|t| t.executor_id == ExecutorId::new("e1")));
    // The leftover is what neither the tasks nor the executor hold.
    let leftover = single_offer(&h.advance(5 * MS), s.fc);
    assert_eq!(leftover.resources, res("cpus:1.5;mem:1.5GiB"));

    // Tasks end: the executor keeps its share.
    h.finish(&s, "t1");
    h.finish(&s, "t2");
    assert_eq!(h.m.agents()[0].used, res("cpus:0.5;mem:512MiB"));
    assert_eq!(h.m.frameworks()[0].used, res("cpus:0.5;mem:512MiB"));
    // A later task for the running executor takes only its own resources.
    let acts = h.call(s.fc, accept(&leftover, vec![exec_task("t3", "cpus:1;mem:1GiB", &e)], None));
    assert_eq!(run_tasks(&acts, s.ac).len(), 1);
    assert_eq!(h.m.agents()[0].used, res("cpus:1.5;mem:1.5GiB"));

    // The executor exits: its resources come back and the framework is told.
    let acts = h.agent(
        s.ac,
        AgentMessage::ExecutorExited {
            framework_id: s.fw.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "exit status 3".into(),
        },
    );
    assert_eq!(
        events(&acts, s.fc),
        vec![SchedulerEvent::ExecutorExited {
            agent_id: s.agent.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "exit status 3".into(),
        }]
    );
    assert_eq!(h.m.executors.len(), 0);
    assert_eq!(h.m.agents()[0].used, res("cpus:1;mem:1GiB"));
    assert_eq!(h.m.frameworks()[0].used, res("cpus:1;mem:1GiB"));
    // Reported twice: nothing more to free (the framework still hears of it).
    h.agent(
        s.ac,
        AgentMessage::ExecutorExited {
            framework_id: s.fw.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "again".into(),
        },
    );
    assert_eq!(h.m.agents()[0].used, res("cpus:1;mem:1GiB"));

    // The next task naming it starts a new executor, which takes its resources again.
    let offer = single_offer(&h.advance(5 * MS), s.fc);
    assert_eq!(offer.resources, res("cpus:3;mem:3GiB"));
    let acts = h.call(s.fc, accept(&offer, vec![exec_task("t4", "cpus:1;mem:1GiB", &e)], None));
    assert_eq!(run_tasks(&acts, s.ac).len(), 1);
    assert_eq!(h.m.agents()[0].used, res("cpus:2.5;mem:2.5GiB"));
    assert_eq!(h.m.executors.len(), 1);
}

/// The agent runs one process of an executor per user its tasks run as: a second user's
/// first task takes the executor's resources from the offer again, the same user's next task
/// does not, every user's process must run the same ExecutorInfo, and the agent's report that
/// the executor ended frees every user's share.
#[test]
fn executor_resources_are_taken_once_per_user_of_the_executor() {
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:8;mem:8GiB");
    let e = executor_info("e1", "cpus:0.5;mem:512MiB");
    let as_user = |id: &str, user: Option<&str>, e: &ExecutorInfo| TaskInfo {
        user: user.map(str::to_owned),
        ..exec_task(id, "cpus:1;mem:1GiB", e)
    };
    let acts = h.call(
        s.fc,
        accept(
            &offer,
            vec![
                as_user("t1", Some("alice"), &e),
                as_user("t2", Some("bob"), &e),
                as_user("t3", Some("alice"), &e),
                as_user("t4", None, &e),
            ],
            None,
        ),
    );
    assert!(updates(&acts, s.fc).is_empty(), "{acts:#?}");
    assert_eq!(run_tasks(&acts, s.ac).len(), 4);
    // Four tasks and three processes (alice, bob, the agent's default user).
    assert_eq!(h.m.executors.len(), 3);
    assert_eq!(h.m.agents()[0].used, res("cpus:5.5;mem:5.5GiB"));
    assert_eq!(h.m.frameworks()[0].used, res("cpus:5.5;mem:5.5GiB"));
    let leftover = single_offer(&h.advance(5 * MS), s.fc);
    assert_eq!(leftover.resources, res("cpus:2.5;mem:2.5GiB"));

    // Another ExecutorInfo under the same id is refused whichever user asks.
    let mut other = e.clone();
    other.resources = res("cpus:0.25;mem:256MiB");
    let acts = h.call(s.fc, accept(&leftover, vec![as_user("t5", Some("carol"), &other)], None));
    assert!(run_tasks(&acts, s.ac).is_empty());
    let ups = updates(&acts, s.fc);
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].state, TaskState::Error);
    assert!(ups[0].message.contains("already running with a different ExecutorInfo"), "{}", ups[0].message);
    assert_eq!(h.m.executors.len(), 3);

    // The executor ends (its last process): every user's share comes back.
    let acts = h.agent(
        s.ac,
        AgentMessage::ExecutorExited {
            framework_id: s.fw.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "exit status 1".into(),
        },
    );
    assert_eq!(events(&acts, s.fc).len(), 1);
    assert_eq!(h.m.executors.len(), 0);
    assert_eq!(h.m.agents()[0].used, res("cpus:4;mem:4GiB"));
}

#[test]
fn a_task_whose_new_executor_does_not_fit_gets_task_error() {
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:2;mem:2GiB");
    let e = executor_info("e1", "cpus:1;mem:32MiB");
    let acts = h.call(s.fc, accept(&offer, vec![exec_task("t1", "cpus:1.5;mem:1GiB", &e)], None));
    assert!(run_tasks(&acts, s.ac).is_empty());
    let ups = updates(&acts, s.fc);
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].state, TaskState::Error);
    assert_eq!(ups[0].reason, "invalid launch");
    assert_eq!(
        ups[0].message,
        "task t1 asks for cpus:1.5;mem:1GiB and its new executor e1 for cpus:1;mem:32MiB but the offer \
         has cpus:2;mem:2GiB left"
    );
    assert_eq!(h.m.executors.len(), 0);
    assert_eq!(h.m.agents()[0].used, Resources::default());
    // Everything comes back.
    let again = single_offer(&h.advance(5 * MS), s.fc);
    assert_eq!(again.resources, res("cpus:2;mem:2GiB"));
    // The same task fits with a smaller executor; the task after it no longer does.
    let small = executor_info("e1", "cpus:0.5;mem:32MiB");
    let acts = h.call(
        s.fc,
        accept(
            &again,
            vec![exec_task("t1", "cpus:1.5;mem:1GiB", &small), exec_task("t2", "cpus:0.1;mem:1MiB", &small)],
            None,
        ),
    );
    assert_eq!(run_tasks(&acts, s.ac).len(), 1);
    let ups = updates(&acts, s.fc);
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].task_id.as_str(), "t2");
    assert_eq!(ups[0].message, "task t2 asks for cpus:0.1;mem:1MiB but the offer has mem:992MiB left");
    assert_eq!(h.m.agents()[0].used, res("cpus:2;mem:1056MiB"));
}

#[test]
fn invalid_executor_infos_get_task_error() {
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:8;mem:8GiB");
    let good = executor_info("e1", "cpus:0.1;mem:32MiB");
    let with = |tid: &str, f: &dyn Fn(&mut ExecutorTask)| {
        let mut t = exec_task(tid, "cpus:0.1;mem:1MiB", &good);
        if let TaskKind::Executor(e) = &mut t.kind {
            f(e);
        }
        t
    };
    let missing = Digest::of(b"not uploaded");
    let tasks = vec![
        with("reserved", &|e| e.executor.executor_id = ExecutorId::new("agora-wasm")),
        with("slash", &|e| e.executor.executor_id = ExecutorId::new("a/b")),
        with("noargv", &|e| e.executor.command.argv.clear()),
        with("env", &|e| e.executor.command.env.push(("A=B".into(), "1".into()))),
        with("upload", &|e| e.executor.fetch[0].artifact.digest = missing.clone()),
        with("escape", &|e| e.executor.fetch[0].path = "../exec".into()),
        with("data", &|e| e.data = vec![0; MAX_TASK_DATA + 1]),
        with("nores", &|e| e.executor.resources = Resources::default()),
        with("ok", &|_| {}),
    ];
    let acts = h.call(s.fc, accept(&offer, tasks, None));
    assert_eq!(run_tasks(&acts, s.ac).iter().map(|t| t.task_id.as_str()).collect::<Vec<_>>(), ["ok"]);
    let ups = updates(&acts, s.fc);
    assert!(ups.iter().all(|u| u.state == TaskState::Error && u.reason == "invalid launch"));
    let messages: Vec<&str> = ups.iter().map(|u| u.message.as_str()).collect();
    assert_eq!(
        messages,
        vec![
            "task reserved: executor id `agora-wasm` is reserved (ids starting `agora-` name built-in \
             executors)"
                .to_string(),
            "task slash: executor id \"a/b\" may contain only letters, digits, `.`, `_` and `-`".to_string(),
            "task noargv: executor e1 has an empty command".to_string(),
            "task env: executor e1: environment variable name \"A=B\" is empty or contains `=` or NUL"
                .to_string(),
            format!(
                "task upload: executor e1: artifact {missing} for `exec` is not in the master's artifact \
                 store; upload it first"
            ),
            "task escape: executor e1: fetch path \"../exec\" has a `..` component".to_string(),
            format!(
                "task data carries {} bytes of data, over the limit of {MAX_TASK_DATA}",
                MAX_TASK_DATA + 1
            ),
            "task nores: executor e1 asks for no cpus and no mem".to_string(),
        ]
    );
    assert_eq!(h.m.executors.len(), 1);
    assert_eq!(h.m.agents()[0].used, res("cpus:0.2;mem:33MiB"));
}

#[test]
fn a_different_executor_info_for_the_same_id_is_refused() {
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:8;mem:8GiB");
    let a = executor_info("e1", "cpus:0.1;mem:32MiB");
    let b = executor_info("e1", "cpus:0.2;mem:32MiB");
    let mismatch = |tid: &str| {
        format!(
            "task {tid}: executor e1 on agent {} is already running with a different ExecutorInfo",
            s.agent
        )
    };
    // Within one call: the first one wins.
    let acts = h.call(
        s.fc,
        accept(
            &offer,
            vec![exec_task("t1", "cpus:1;mem:1MiB", &a), exec_task("t2", "cpus:1;mem:1MiB", &b)],
            None,
        ),
    );
    assert_eq!(run_tasks(&acts, s.ac).len(), 1);
    let ups = updates(&acts, s.fc);
    assert_eq!(ups.len(), 1);
    assert_eq!((ups[0].task_id.as_str(), ups[0].state), ("t2", TaskState::Error));
    assert_eq!(ups[0].message, mismatch("t2"));
    // In a later call: compared with the executor running there.
    let offer = single_offer(&h.advance(5 * MS), s.fc);
    let mut renamed = a.clone();
    renamed.name = "other name".into();
    let acts = h.call(s.fc, accept(&offer, vec![exec_task("t3", "cpus:1;mem:1MiB", &renamed)], None));
    assert!(run_tasks(&acts, s.ac).is_empty());
    assert_eq!(updates(&acts, s.fc)[0].message, mismatch("t3"));
    assert_eq!(h.m.executors.len(), 1);
    assert_eq!(h.m.agents()[0].used, res("cpus:1.1;mem:33MiB"));
    // Another framework's executor of the same id is its own: no mismatch, its own resources.
    let (f2, fw2) = h.subscribe("bob", SEC);
    let offer2 = single_offer(&h.advance(5 * MS), f2);
    let acts = h.call(f2, accept(&offer2, vec![exec_task("t1", "cpus:1;mem:1MiB", &b)], None));
    assert_eq!(run_tasks(&acts, s.ac).len(), 1);
    assert!(updates(&acts, f2).is_empty());
    assert_eq!(h.m.executors.len(), 2);
    assert_eq!(h.m.agents()[0].used, res("cpus:2.3;mem:66MiB"));
    let used: Vec<(FrameworkId, Resources)> = h.m.frameworks().into_iter().map(|f| (f.id, f.used)).collect();
    assert_eq!(used, vec![(s.fw.clone(), res("cpus:1.1;mem:33MiB")), (fw2, res("cpus:1.2;mem:33MiB"))]);
}

#[test]
fn framework_messages_are_relayed_both_ways() {
    let mut h = Harness::with_executor_binary();
    let s = h.running_task("cpus:4;mem:4GiB", "cpus:1;mem:1GiB", SEC);
    let e1 = ExecutorId::new("e1");
    // Scheduler → executor: to the agent, under the caller's framework id.
    let acts = h.call(
        s.fc,
        SchedulerCall::Message { agent_id: s.agent.clone(), executor_id: e1.clone(), data: b"hi".to_vec() },
    );
    assert_eq!(
        acts,
        vec![Action::ToAgent {
            conn: s.ac,
            msg: MasterToAgent::FrameworkMessage {
                framework_id: s.fw.clone(),
                executor_id: e1.clone(),
                data: b"hi".to_vec()
            },
        }]
    );
    // The largest message passes; one byte more is refused.
    let acts = h.call(
        s.fc,
        SchedulerCall::Message {
            agent_id: s.agent.clone(),
            executor_id: e1.clone(),
            data: vec![7; MAX_FRAMEWORK_MESSAGE],
        },
    );
    assert_eq!(to_agent(&acts, s.ac).len(), 1);
    let acts = h.call(
        s.fc,
        SchedulerCall::Message {
            agent_id: s.agent.clone(),
            executor_id: e1.clone(),
            data: vec![7; MAX_FRAMEWORK_MESSAGE + 1],
        },
    );
    assert_eq!(
        errors(&acts, s.fc),
        vec![WireError::new(
            ErrorCode::TooLarge,
            format!(
                "framework message of {} bytes to executor e1 is over the limit of {MAX_FRAMEWORK_MESSAGE} bytes",
                MAX_FRAMEWORK_MESSAGE + 1
            )
        )]
    );
    assert!(to_agent(&acts, s.ac).is_empty());
    assert!(closed(&acts, s.fc).is_none());
    // An unknown agent.
    let acts = h.call(
        s.fc,
        SchedulerCall::Message { agent_id: AgentId::new("nope"), executor_id: e1.clone(), data: vec![] },
    );
    assert_eq!(errors(&acts, s.fc), vec![WireError::new(ErrorCode::NotFound, "no agent nope")]);

    // Executor → scheduler.
    let from_agent = |fw: &FrameworkId, data: Vec<u8>| AgentMessage::FrameworkMessage {
        framework_id: fw.clone(),
        executor_id: ExecutorId::new("e1"),
        data,
    };
    let acts = h.agent(s.ac, from_agent(&s.fw, b"result".to_vec()));
    assert_eq!(
        acts,
        vec![Action::ToFramework {
            conn: s.fc,
            event: SchedulerEvent::Message {
                agent_id: s.agent.clone(),
                executor_id: e1.clone(),
                data: b"result".to_vec()
            },
        }]
    );
    // Too large, or for a framework that is unknown or away: dropped, never kept.
    assert!(h.agent(s.ac, from_agent(&s.fw, vec![0; MAX_FRAMEWORK_MESSAGE + 1])).is_empty());
    assert!(h.agent(s.ac, from_agent(&FrameworkId::new("m-F99"), b"x".to_vec())).is_empty());
    h.m.handle(h.now, Event::FrameworkDisconnected { conn: s.fc });
    h.drain();
    assert!(h.agent(s.ac, from_agent(&s.fw, b"lost".to_vec())).is_empty());
    let fc = h.conn();
    let acts = h.call(fc, SchedulerCall::Subscribe(info(Some(&s.fw), SEC)));
    assert!(!events(&acts, fc).iter().any(|e| matches!(e, SchedulerEvent::Message { .. })));

    // An agent that is not connected.
    h.m.handle(h.now, Event::AgentDisconnected { conn: s.ac });
    h.drain();
    let acts = h.call(
        fc,
        SchedulerCall::Message { agent_id: s.agent.clone(), executor_id: e1.clone(), data: vec![] },
    );
    assert_eq!(
        errors(&acts, fc),
        vec![WireError::new(ErrorCode::NotFound, format!("agent {} is disconnected", s.agent))]
    );
}

#[test]
fn shutdown_executor_is_relayed_and_resources_wait_for_the_exit() {
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:4;mem:4GiB");
    let e = executor_info("e1", "cpus:0.5;mem:512MiB");
    h.call(s.fc, accept(&offer, vec![exec_task("t1", "cpus:1;mem:1GiB", &e)], None));
    let acts = h.call(
        s.fc,
        SchedulerCall::ShutdownExecutor { agent_id: s.agent.clone(), executor_id: ExecutorId::new("e1") },
    );
    assert_eq!(
        acts,
        vec![Action::ToAgent {
            conn: s.ac,
            msg: MasterToAgent::ShutdownExecutor {
                framework_id: s.fw.clone(),
                executor_id: ExecutorId::new("e1")
            },
        }]
    );
    assert_eq!(h.m.agents()[0].used, res("cpus:1.5;mem:1.5GiB"));
    let acts = h.call(
        s.fc,
        SchedulerCall::ShutdownExecutor {
            agent_id: AgentId::new("nope"),
            executor_id: ExecutorId::new("e1"),
        },
    );
    assert_eq!(errors(&acts, s.fc), vec![WireError::new(ErrorCode::NotFound, "no agent nope")]);
    // The agent kills the task and reports the exit.
    h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Killed);
    h.agent(
        s.ac,
        AgentMessage::ExecutorExited {
            framework_id: s.fw.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "shut down".into(),
        },
    );
    assert_eq!(h.m.agents()[0].used, Resources::default());
}

#[test]
fn a_framework_cannot_address_another_frameworks_executors() {
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:4;mem:4GiB");
    let e = executor_info("e1", "cpus:0.5;mem:512MiB");
    h.call(s.fc, accept(&offer, vec![exec_task("t1", "cpus:1;mem:1GiB", &e)], None));
    let (f2, fw2) = h.subscribe("bob", SEC);
    // Bob names Alice's agent and executor: the agent hears Bob's framework id, so his
    // message and his shutdown can only reach an executor of his own.
    let acts = h.call(
        f2,
        SchedulerCall::Message {
            agent_id: s.agent.clone(),
            executor_id: ExecutorId::new("e1"),
            data: vec![1],
        },
    );
    assert_eq!(
        to_agent(&acts, s.ac),
        vec![MasterToAgent::FrameworkMessage {
            framework_id: fw2.clone(),
            executor_id: ExecutorId::new("e1"),
            data: vec![1]
        }]
    );
    let acts = h.call(
        f2,
        SchedulerCall::ShutdownExecutor { agent_id: s.agent.clone(), executor_id: ExecutorId::new("e1") },
    );
    assert_eq!(
        to_agent(&acts, s.ac),
        vec![MasterToAgent::ShutdownExecutor {
            framework_id: fw2.clone(),
            executor_id: ExecutorId::new("e1")
        }]
    );
    // An exit reported for Bob's (non-existent) e1 frees nothing of Alice's.
    let acts = h.agent(
        s.ac,
        AgentMessage::ExecutorExited {
            framework_id: fw2.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "never ran".into(),
        },
    );
    assert!(events(&acts, s.fc).is_empty());
    assert_eq!(h.m.executors.len(), 1);
    assert_eq!(h.m.agents()[0].used, res("cpus:1.5;mem:1.5GiB"));
    // Messages of Alice's executor go to Alice only.
    let acts = h.agent(
        s.ac,
        AgentMessage::FrameworkMessage {
            framework_id: s.fw.clone(),
            executor_id: ExecutorId::new("e1"),
            data: vec![2],
        },
    );
    assert_eq!(events(&acts, s.fc).len(), 1);
    assert!(events(&acts, f2).is_empty());
}

#[test]
fn executor_resources_go_with_the_framework_and_the_agent() {
    // Framework removed: its executors' resources are free, and agents where it had only
    // an executor left are told to shut it down.
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:4;mem:4GiB");
    let e = executor_info("e1", "cpus:0.5;mem:512MiB");
    h.call(s.fc, accept(&offer, vec![exec_task("t1", "cpus:1;mem:1GiB", &e)], None));
    h.finish(&s, "t1");
    assert_eq!(h.m.agents()[0].used, res("cpus:0.5;mem:512MiB"));
    let acts = h.call(s.fc, SchedulerCall::Teardown);
    assert_eq!(to_agent(&acts, s.ac), vec![MasterToAgent::ShutdownFramework { framework_id: s.fw.clone() }]);
    assert_eq!(h.m.executors.len(), 0);
    assert_eq!(h.m.agents()[0].used, Resources::default());

    // Agent lost: its executors are forgotten; back with a task of one, it is adopted
    // with its resources again.
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:4;mem:4GiB");
    let t1 = exec_task("t1", "cpus:1;mem:1GiB", &e);
    h.call(s.fc, accept(&offer, vec![t1.clone()], None));
    h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Running);
    h.advance(21 * SEC);
    assert_eq!(h.m.agents()[0].status, AgentViewStatus::Unreachable);
    assert_eq!(h.m.executors.len(), 0);
    assert_eq!(h.m.agents()[0].used, res("cpus:1;mem:1GiB"));
    let report = TaskReport { framework_id: s.fw.clone(), task: t1, state: TaskState::Running };
    h.register(Some(s.agent.clone()), "cpus:4;mem:4GiB", vec![report]);
    assert_eq!(h.m.executors.len(), 1);
    assert_eq!(h.m.agents()[0].used, res("cpus:1.5;mem:1.5GiB"));
    assert_eq!(h.m.frameworks()[0].used, res("cpus:1.5;mem:1.5GiB"));
    // Back again without it (restarted agent): the executor is gone with its task.
    let (_, _, acts) = h.register(Some(s.agent.clone()), "cpus:4;mem:4GiB", vec![]);
    assert_eq!(updates(&acts, s.fc)[0].state, TaskState::Gone);
    assert_eq!(h.m.executors.len(), 0);
    assert_eq!(h.m.agents()[0].used, Resources::default());
}
