//! The runner: one task in the agent that sleeps on the [`Clock`] until the next due time of
//! any enabled task (or until the tasks change), runs what is due, and sleeps again. No
//! polling: with no task it waits for one to be added. See the module docs of
//! `service::schedules` for the rules (missed runs, overlap, disabled tasks).

use std::sync::Arc;

use super::{Missed, Schedules, Trigger};
use crate::service::{ServiceError, domain::Actor};

/// Runs the scheduler until [`Schedules::stop`] (the agent stops). At start it closes runs a
/// stopped agent left `running`; a due time at or before its start is a missed one.
pub fn run(schedules: Arc<Schedules>) -> impl std::future::Future<Output = ()> + Send {
    // Due times at or before the runner's start were missed (the agent was down): its start is
    // when it is made, not when the task first runs.
    let started = schedules.clock().now_ms().div_euclid(1000);
    async move {
        let mut runs = tokio::task::JoinSet::new();
        run_until_stopped(schedules, started, &mut runs).await;
        // Runs still going end with the API they call (it is stopping too) and are recorded;
        // none holds the service once this returns.
        while runs.join_next().await.is_some() {}
    }
}

async fn run_until_stopped(
    schedules: Arc<Schedules>,
    started: i64,
    runs: &mut tokio::task::JoinSet<()>,
) {
    let me = schedules.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || me.close_interrupted())
        .await
        .unwrap_or(Ok(()))
    {
        tracing::warn!(error = %e, "could not close interrupted scheduled runs");
    }
    // Due times whose run could not even be recorded (the store failed): not tried again in a
    // tight loop; the next due time is.
    let mut given_up = std::collections::HashSet::new();
    loop {
        while runs.try_join_next().is_some() {}
        if *schedules.stopping.borrow() {
            return;
        }
        let clock = schedules.clock();
        let now_ms = clock.now_ms();
        let now = now_ms.div_euclid(1000);
        let plan = match plan(&schedules, now).await {
            Ok(p) => p,
            Err(e) => {
                // The store failed: try again in a minute (or at the next change).
                tracing::warn!(error = %e, "scheduled tasks unreadable; retrying in 60 s");
                tokio::select! {
                    () = clock.sleep_until(now_ms + 60_000) => {}
                    () = schedules.changed() => {}
                    () = schedules.stopped() => return,
                }
                continue;
            }
        };
        let mut next: Option<i64> = None;
        let mut fired = false;
        for (id, due, missed) in plan {
            if given_up.contains(&(id, due)) {
                continue;
            }
            if due > now {
                next = Some(next.map_or(due, |n| n.min(due)));
                continue;
            }
            let trigger = if due <= started {
                Trigger::Missed
            } else {
                Trigger::Schedule
            };
            if !fire(&schedules, runs, id, due, trigger, missed).await {
                given_up.insert((id, due));
            }
            fired = true;
        }
        if fired {
            // What was due is recorded: plan again for the next due times.
            continue;
        }
        match next {
            Some(t) => {
                tokio::select! {
                    () = clock.sleep_until(t * 1000) => {}
                    () = schedules.changed() => {}
                    () = schedules.stopped() => return,
                }
            }
            None => {
                tokio::select! {
                    () = schedules.changed() => {}
                    () = schedules.stopped() => return,
                }
            }
        }
    }
}

async fn plan(
    schedules: &Arc<Schedules>,
    now: i64,
) -> Result<Vec<(u64, i64, Missed)>, ServiceError> {
    let me = schedules.clone();
    tokio::task::spawn_blocking(move || me.plan(now))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Acts on task `id`'s due time `due`: a missed one of a `--missed skip` task is recorded
/// skipped; one whose previous run is still going is recorded skipped; otherwise its run starts
/// (recorded before this returns, so the next plan sees it) and goes on in its own task.
/// Whether the due time was acted on (false: it could not be recorded).
async fn fire(
    schedules: &Arc<Schedules>,
    runs: &mut tokio::task::JoinSet<()>,
    id: u64,
    due: i64,
    trigger: Trigger,
    missed: Missed,
) -> bool {
    let me = schedules.clone();
    let begun = tokio::task::spawn_blocking(move || {
        if trigger == Trigger::Missed && missed == Missed::Skip {
            me.skip(
                id,
                trigger,
                due,
                "missed while the agent was down (--missed skip)",
            )
            .map(|_| None)
        } else {
            match me.begin(&Actor::Schedule { id }, id, trigger, Some(due)) {
                Ok(run) => Ok(Some(run)),
                Err(ServiceError::TaskRunning { .. }) => me
                    .skip(id, trigger, due, "the previous run was still going")
                    .map(|_| None),
                Err(e) => Err(e),
            }
        }
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    let run = match begun {
        Ok(Some(run)) => run,
        Ok(None) => return true,
        Err(e) => {
            tracing::warn!(task = id, error = %e, "scheduled run not started");
            return false;
        }
    };
    let Ok(commands) = schedules.commands() else {
        tracing::warn!(task = id, "no command runner; run recorded as failed");
        let me = schedules.clone();
        let _ = tokio::task::spawn_blocking(move || {
            me.finish(
                run,
                super::Outcome {
                    exit_code: 1,
                    error: Some(ServiceError::NoScheduler.to_string()),
                    ..Default::default()
                },
            )
        })
        .await;
        return true;
    };
    let me = schedules.clone();
    runs.spawn(async move {
        let args = match me.load(id) {
            Ok(t) => t.args,
            Err(e) => {
                tracing::warn!(task = id, error = %e, "scheduled task gone before its run");
                me.release(id);
                return;
            }
        };
        tracing::info!(task = id, run = run.n, command = %args.join(" "), "scheduled run");
        let outcome = commands.run(id, args).await;
        let me2 = me.clone();
        match tokio::task::spawn_blocking(move || me2.finish(run, outcome)).await {
            Ok(Ok(r)) => tracing::info!(
                task = id,
                run = r.n,
                status = r.status.name(),
                "scheduled run ended"
            ),
            Ok(Err(e)) => tracing::warn!(task = id, error = %e, "scheduled run's end not recorded"),
            Err(e) => tracing::warn!(task = id, error = %e, "scheduled run's end aborted"),
        }
    });
    true
}
