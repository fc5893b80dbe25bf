//! Table tests of the Job's status: every phase, its conditions, and no change (so no write)
//! when nothing changed.

use super::*;
use k8s_openapi::jiff::Timestamp;
use soma_crds::common::condition_types::{READY, RECONCILING, STALLED};

fn at(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).expect("time"))
}

fn cond<'a>(s: &'a JobStatus, type_: &str) -> Option<&'a Condition> {
    s.conditions.iter().find(|c| c.type_ == type_)
}

/// (status, reason) of a condition, or ("-", "-") when absent.
fn sr<'a>(s: &'a JobStatus, type_: &str) -> (&'a str, &'a str) {
    cond(s, type_).map_or(("-", "-"), |c| (c.status.as_str(), c.reason.as_str()))
}

fn obs() -> JobObserved {
    JobObserved {
        generation: Some(1),
        retries: 2,
        ..JobObserved::default()
    }
}

fn running(active: i32, failed: i32) -> Run {
    Run {
        active,
        failed,
        start_time: Some("2026-12-07T10:00:00Z".into()),
        ..Run::default()
    }
}

fn spend(tokens: i64, micros: i64, refusals: i64) -> Option<(RunSpend, String)> {
    Some((
        RunSpend {
            requests: 3,
            input_tokens: tokens - 10,
            output_tokens: 10,
            cost_micros: micros,
            refusals,
        },
        "USD".into(),
    ))
}

#[test]
fn every_phase_has_its_conditions() {
    struct Row {
        name: &'static str,
        obs: JobObserved,
        phase: &'static str,
        ready: (&'static str, &'static str),
        reconciling: &'static str,
        stalled: &'static str,
        complete: &'static str,
        failed: &'static str,
        message: &'static str,
    }
    let rows = vec![
        Row {
            name: "missing Agent",
            obs: JobObserved {
                block: Some(Block {
                    reason: "AgentNotFound".into(),
                    message: "Agent \"a\" does not exist; correct spec.agentRef".into(),
                }),
                ..obs()
            },
            phase: "Pending",
            ready: ("False", "AgentNotFound"),
            reconciling: "False",
            stalled: "True",
            complete: "-",
            failed: "-",
            message: "spec.agentRef",
        },
        Row {
            name: "Budget exhausted",
            obs: JobObserved {
                wait: Some(Wait {
                    reason: "BudgetExhausted",
                    message: "Budget research/team is exhausted; the Job starts when its period resets at 2026-12-08T00:00:00+00:00".into(),
                }),
                ..obs()
            },
            phase: "Waiting",
            ready: ("False", "BudgetExhausted"),
            reconciling: "True",
            stalled: "False",
            complete: "-",
            failed: "-",
            message: "resets at 2026-12-08",
        },
        Row {
            name: "queued in Kueue",
            obs: JobObserved {
                run: Some(Run {
                    suspended: true,
                    queue: Some("team-a".into()),
                    ..Run::default()
                }),
                ..obs()
            },
            phase: "Queued",
            ready: ("False", "Queued"),
            reconciling: "True",
            stalled: "False",
            complete: "-",
            failed: "-",
            message: "Kueue queue \"team-a\"",
        },
        Row {
            name: "second attempt running",
            obs: JobObserved {
                run: Some(running(1, 1)),
                usage: spend(100, 1_234, 0),
                ..obs()
            },
            phase: "Running",
            ready: ("False", "Running"),
            reconciling: "True",
            stalled: "False",
            complete: "-",
            failed: "-",
            message: "attempt 2 of 3 running; used so far: 100 tokens",
        },
        Row {
            name: "succeeded",
            obs: JobObserved {
                run: Some(Run {
                    succeeded: 1,
                    failed: 1,
                    completion_time: Some("2026-12-07T10:05:00Z".into()),
                    outcome: Some(Outcome::Succeeded),
                    ..running(0, 1)
                }),
                result: Some("the summary".into()),
                usage: spend(100, 1_234, 0),
                ..obs()
            },
            phase: "Succeeded",
            ready: ("True", "Succeeded"),
            reconciling: "False",
            stalled: "False",
            complete: "True",
            failed: "-",
            message: "completed after 2 attempt(s); used 100 tokens and 1234 micro-USD in 3 calls",
        },
        Row {
            name: "retries used up",
            obs: JobObserved {
                run: Some(Run {
                    failed: 3,
                    outcome: Some(Outcome::Failed {
                        reason: "BackoffLimitExceeded".into(),
                        message: "Job has reached the specified backoff limit".into(),
                    }),
                    ..running(0, 3)
                }),
                last_exit: Some("exit code 3 (Error)".into()),
                ..obs()
            },
            phase: "Failed",
            ready: ("False", "BackoffLimitExceeded"),
            reconciling: "False",
            stalled: "True",
            complete: "-",
            failed: "True",
            message: "all 3 attempt(s) failed (retries: 2); the last attempt ended with exit code 3 (Error)",
        },
        Row {
            name: "deadline",
            obs: JobObserved {
                run: Some(Run {
                    failed: 1,
                    outcome: Some(Outcome::Failed {
                        reason: "DeadlineExceeded".into(),
                        message: "Job was active longer than specified deadline".into(),
                    }),
                    ..running(0, 1)
                }),
                ..obs()
            },
            phase: "Failed",
            ready: ("False", "DeadlineExceeded"),
            reconciling: "False",
            stalled: "True",
            complete: "-",
            failed: "True",
            message: "longer than deadlineSeconds",
        },
        Row {
            name: "out of budget mid-way",
            obs: JobObserved {
                run: Some(Run {
                    failed: 1,
                    outcome: Some(Outcome::Failed {
                        reason: "BackoffLimitExceeded".into(),
                        message: "Job has reached the specified backoff limit".into(),
                    }),
                    ..running(0, 1)
                }),
                usage: spend(500, 900_000, 2),
                ..obs()
            },
            phase: "Failed",
            ready: ("False", "BudgetExhausted"),
            reconciling: "False",
            stalled: "True",
            complete: "-",
            failed: "True",
            message: "its Budget refused 2 call(s): a Budget of its chain is used up; it used 500 tokens and 0.90 USD in 3 calls before",
        },
        Row {
            name: "scheduled drill",
            obs: JobObserved {
                schedule: Some(Schedule {
                    schedule: "0 3 * * *".into(),
                    ..Schedule::default()
                }),
                ..obs()
            },
            phase: "Scheduled",
            ready: ("True", "Scheduled"),
            reconciling: "False",
            stalled: "False",
            complete: "-",
            failed: "-",
            message: "\"0 3 * * *\"; no run has reported yet",
        },
    ];
    for r in rows {
        let s = job_status(None, &r.obs, &at(100));
        assert_eq!(s.phase.as_deref(), Some(r.phase), "{}", r.name);
        assert_eq!(sr(&s, READY), r.ready, "{}", r.name);
        assert_eq!(sr(&s, RECONCILING).0, r.reconciling, "{}", r.name);
        assert_eq!(sr(&s, STALLED).0, r.stalled, "{}", r.name);
        assert_eq!(sr(&s, COMPLETE).0, r.complete, "{}", r.name);
        assert_eq!(sr(&s, FAILED).0, r.failed, "{}", r.name);
        let ready = cond(&s, READY).expect("Ready");
        let shown = cond(&s, FAILED).or(cond(&s, COMPLETE)).unwrap_or(ready);
        assert!(
            shown.message.contains(r.message),
            "{}: {:?} lacks {:?}",
            r.name,
            shown.message,
            r.message
        );
        assert_eq!(s.observed_generation, Some(1), "{}", r.name);
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(1)),
            "{}",
            r.name
        );
        // The same observation later changes nothing: no write, no loop.
        let again = job_status(Some(&s), &r.obs, &at(200));
        assert_eq!(
            again, s,
            "{}: a second computation changed the status",
            r.name
        );
    }
}

#[test]
fn run_figures_and_the_result_reach_status() {
    let o = JobObserved {
        run: Some(Run {
            succeeded: 1,
            completion_time: Some("2026-12-07T10:05:00Z".into()),
            outcome: Some(Outcome::Succeeded),
            ..running(0, 0)
        }),
        result: Some("42".into()),
        usage: spend(2_000, 12_345_678, 0),
        ..obs()
    };
    let s = job_status(None, &o, &at(1));
    assert_eq!(s.attempts, 1);
    assert_eq!(s.start_time.as_deref(), Some("2026-12-07T10:00:00Z"));
    assert_eq!(s.completion_time.as_deref(), Some("2026-12-07T10:05:00Z"));
    assert_eq!(s.result.as_deref(), Some("42"));
    let u = s.usage.expect("usage");
    assert_eq!(
        (u.requests, u.tokens, u.cost_micros),
        (3, 2_000, 12_345_678)
    );
    assert_eq!(u.cost_display.as_deref(), Some("12.35 USD"));
    assert_eq!(
        finished(Some(&job_status(None, &o, &at(1)))),
        Some(Some("2026-12-07T10:05:00Z"))
    );
    assert_eq!(finished(Some(&job_status(None, &obs(), &at(1)))), None);
}

#[test]
fn a_drill_reports_its_figures_and_whether_it_passed() {
    let passed = Measured {
        passed: true,
        snapshot_at: "2026-12-07T03:00:00Z".into(),
        rpo_seconds: 1.5,
        records_missed: 12,
        rto_seconds: 4.25,
        records_restored: 100_000,
        stream_messages: 100_012,
        chain_verified: true,
        ..Measured::default()
    };
    let o = JobObserved {
        run: Some(Run {
            succeeded: 1,
            outcome: Some(Outcome::Succeeded),
            ..running(0, 0)
        }),
        drill: Some(passed.clone()),
        ..obs()
    };
    let s = job_status(None, &o, &at(1));
    assert_eq!(sr(&s, DRILL_PASSED), ("True", "Passed"));
    let d = s.drill.clone().expect("drill");
    assert_eq!(
        (
            d.outcome.as_str(),
            d.rpo_seconds,
            d.rto_seconds,
            d.records_restored
        ),
        ("Passed", 1.5, 4.25, 100_000)
    );
    assert!(
        s.result
            .as_deref()
            .unwrap_or_default()
            .contains("100000 records restored and verified in 4.2 s (RTO); RPO 1.5 s"),
        "{:?}",
        s.result
    );
    let failed_drill = Measured {
        passed: false,
        discrepancies: (0..15).map(|i| format!("discrepancy {i}")).collect(),
        ..passed
    };
    let o = JobObserved {
        run: Some(Run {
            failed: 1,
            outcome: Some(Outcome::Failed {
                reason: "BackoffLimitExceeded".into(),
                message: "m".into(),
            }),
            ..running(0, 1)
        }),
        drill: Some(failed_drill),
        ..obs()
    };
    let s = job_status(None, &o, &at(1));
    assert_eq!(sr(&s, READY), ("False", "DrillFailed"));
    assert_eq!(sr(&s, DRILL_PASSED), ("False", "Failed"));
    assert!(
        cond(&s, FAILED)
            .expect("Failed")
            .message
            .contains("drill failed: discrepancy 0")
    );
    assert_eq!(
        s.drill.expect("drill").discrepancies.len(),
        10,
        "at most 10 in status"
    );
}

#[test]
fn a_long_result_is_cut_on_a_character_boundary() {
    let text = "é".repeat(3000);
    let cut = bounded(&text, 4096);
    assert!(
        cut.len() <= 4096 && cut.ends_with("…(truncated)"),
        "{}",
        cut.len()
    );
    assert_eq!(bounded("short", 4096), "short");
}
