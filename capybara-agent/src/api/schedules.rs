//! The `Schedules` service (scheduled tasks, `service::schedules`) and its client calls.
//!
//! Scopes: `ListSchedules` read; everything else admin (`AddSchedule`, `RunSchedule`,
//! `EnableSchedule`, `DisableSchedule`, `DeleteSchedule`: a task acts as admin;
//! `ScheduleHistory`: a run's output may hold what only an admin sees, a new token's secret
//! say).

use capybara_proto::v1::{self as pb, schedules_client::SchedulesClient, schedules_server};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::AnswerError,
    handler::Api,
    status::invalid,
};
use crate::service::{
    domain::Scope,
    schedules::{Missed, Run, RunStatus, Task, TaskView, Trigger},
};

fn id_of(id: &str) -> Result<u64, Status> {
    crate::service::schedules::parse_id("id", id).map_err(invalid)
}

fn run_to_proto(r: &Run) -> pb::ScheduleRun {
    pb::ScheduleRun {
        task: r.task,
        n: r.n,
        trigger: r.trigger.name().into(),
        due: r.due.unwrap_or(0),
        started_ms: r.started_ms,
        ended_ms: r.ended_ms.unwrap_or(0),
        status: r.status.name().into(),
        exit_code: r.exit_code.map(u32::from),
        error: r.error.clone().unwrap_or_default(),
        output: r.output.clone(),
        output_dropped: r.output_dropped,
    }
}

fn task_to_proto(v: &TaskView) -> pb::ScheduledTask {
    let t = &v.task;
    pb::ScheduledTask {
        id: t.id,
        command: t.command.clone(),
        cron: t.cron.clone(),
        tz: t.tz.clone(),
        missed: t.missed.name().into(),
        enabled: t.enabled,
        created_at: t.created_at,
        created_by: t.created_by.clone(),
        next_run: v.next_run.unwrap_or(0),
        last_run: t.last_run.as_ref().map(|l| pb::ScheduleRun {
            task: t.id,
            n: l.n,
            started_ms: l.started_ms,
            ended_ms: l.ended_ms.unwrap_or(0),
            status: l.status.name().into(),
            ..Default::default()
        }),
    }
}

fn status_from(field: &'static str, s: &str) -> Result<RunStatus, AnswerError> {
    Ok(match s {
        "running" => RunStatus::Running,
        "ok" => RunStatus::Ok,
        "failed" => RunStatus::Failed,
        "skipped" => RunStatus::Skipped,
        _ => return Err(AnswerError::Invalid { field }),
    })
}

fn run_from_proto(r: pb::ScheduleRun) -> Result<Run, AnswerError> {
    Ok(Run {
        task: r.task,
        n: r.n,
        trigger: match r.trigger.as_str() {
            "schedule" => Trigger::Schedule,
            "missed" => Trigger::Missed,
            "manual" => Trigger::Manual,
            _ => {
                return Err(AnswerError::Invalid {
                    field: "run.trigger",
                });
            }
        },
        due: (r.due != 0).then_some(r.due),
        started_ms: r.started_ms,
        ended_ms: (r.ended_ms != 0).then_some(r.ended_ms),
        status: status_from("run.status", &r.status)?,
        exit_code: r.exit_code.map(|c| c.min(255) as u8),
        error: (!r.error.is_empty()).then_some(r.error),
        output: r.output,
        output_dropped: r.output_dropped,
    })
}

fn task_from_proto(t: pb::ScheduledTask) -> Result<TaskView, AnswerError> {
    let last_run = match t.last_run {
        Some(l) => Some(crate::service::schedules::RunSummary {
            n: l.n,
            started_ms: l.started_ms,
            ended_ms: (l.ended_ms != 0).then_some(l.ended_ms),
            status: status_from("task.last_run.status", &l.status)?,
        }),
        None => None,
    };
    Ok(TaskView {
        next_run: (t.next_run != 0).then_some(t.next_run),
        task: Task {
            id: t.id,
            args: Vec::new(),
            command: t.command,
            cron: t.cron,
            tz: t.tz,
            missed: Missed::parse("task.missed", &t.missed).map_err(|_| AnswerError::Invalid {
                field: "task.missed",
            })?,
            enabled: t.enabled,
            created_at: t.created_at,
            created_by: t.created_by,
            last_due: 0,
            runs: last_run.as_ref().map_or(0, |l| l.n + 1),
            last_run,
        },
    })
}

fn need_task(t: Option<pb::ScheduledTask>) -> Result<TaskView, ClientError> {
    Ok(task_from_proto(
        t.ok_or(AnswerError::Missing { field: "task" })?,
    )?)
}

impl Api {
    /// `EnableSchedule` and `DisableSchedule`.
    async fn set_schedule_enabled(
        &self,
        req: Request<pb::ScheduleIdRequest>,
        on: bool,
    ) -> Result<Response<pb::ScheduleResponse>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let id = id_of(&req.get_ref().id)?;
        let t = self
            .call(move |s| s.schedules.set_enabled(&actor, id, on))
            .await?;
        Ok(Response::new(pb::ScheduleResponse {
            task: Some(task_to_proto(&t)),
        }))
    }
}

#[tonic::async_trait]
impl schedules_server::Schedules for Api {
    async fn add_schedule(
        &self,
        req: Request<pb::AddScheduleRequest>,
    ) -> Result<Response<pb::ScheduleResponse>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let r = req.into_inner();
        let missed = Missed::parse("missed", &r.missed).map_err(invalid)?;
        let t = self
            .call(move |s| s.schedules.add(&actor, &r.command, &r.cron, &r.tz, missed))
            .await?;
        Ok(Response::new(pb::ScheduleResponse {
            task: Some(task_to_proto(&t)),
        }))
    }

    async fn list_schedules(
        &self,
        req: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let ts = self.call(|s| s.schedules.list()).await?;
        Ok(Response::new(pb::ListSchedulesResponse {
            tasks: ts.iter().map(task_to_proto).collect(),
        }))
    }

    async fn run_schedule(
        &self,
        req: Request<pb::ScheduleIdRequest>,
    ) -> Result<Response<pb::ScheduleRunResponse>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let id = id_of(&req.get_ref().id)?;
        let svc = self.service();
        let run = svc
            .schedules
            .run_now(actor, id)
            .await
            .map_err(super::status::status_of)?;
        Ok(Response::new(pb::ScheduleRunResponse {
            run: Some(run_to_proto(&run)),
        }))
    }

    async fn enable_schedule(
        &self,
        req: Request<pb::ScheduleIdRequest>,
    ) -> Result<Response<pb::ScheduleResponse>, Status> {
        self.set_schedule_enabled(req, true).await
    }

    async fn disable_schedule(
        &self,
        req: Request<pb::ScheduleIdRequest>,
    ) -> Result<Response<pb::ScheduleResponse>, Status> {
        self.set_schedule_enabled(req, false).await
    }

    async fn delete_schedule(
        &self,
        req: Request<pb::ScheduleIdRequest>,
    ) -> Result<Response<pb::ScheduleResponse>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let id = id_of(&req.get_ref().id)?;
        let t = self.call(move |s| s.schedules.delete(&actor, id)).await?;
        Ok(Response::new(pb::ScheduleResponse {
            task: Some(task_to_proto(&TaskView {
                task: t,
                next_run: None,
            })),
        }))
    }

    async fn schedule_history(
        &self,
        req: Request<pb::ScheduleHistoryRequest>,
    ) -> Result<Response<pb::ScheduleHistoryResponse>, Status> {
        self.auth(&req, Scope::Admin)?;
        let id = id_of(&req.get_ref().id)?;
        let limit = match req.get_ref().limit {
            0 => usize::MAX,
            n => n as usize,
        };
        let runs = self.call(move |s| s.schedules.history(id, limit)).await?;
        Ok(Response::new(pb::ScheduleHistoryResponse {
            runs: runs.iter().map(run_to_proto).collect(),
        }))
    }
}

impl Client {
    fn schedules(&self) -> SchedulesClient<tonic::transport::Channel> {
        SchedulesClient::new(self.channel())
    }

    /// Adds a scheduled task.
    pub async fn add_schedule(
        &self,
        command: &str,
        cron: &str,
        tz: &str,
        missed: &str,
    ) -> Result<TaskView, ClientError> {
        let r = self
            .schedules()
            .add_schedule(self.req(pb::AddScheduleRequest {
                command: command.into(),
                cron: cron.into(),
                tz: tz.into(),
                missed: missed.into(),
            }))
            .await?
            .into_inner();
        need_task(r.task)
    }

    /// Every scheduled task.
    pub async fn list_schedules(&self) -> Result<Vec<TaskView>, ClientError> {
        let r = self
            .schedules()
            .list_schedules(self.req(pb::ListSchedulesRequest {}))
            .await?
            .into_inner();
        Ok(r.tasks
            .into_iter()
            .map(task_from_proto)
            .collect::<Result<_, _>>()?)
    }

    /// Runs a task now; its run once it ended.
    pub async fn run_schedule(&self, id: u64) -> Result<Run, ClientError> {
        let r = self
            .schedules()
            .run_schedule(self.req(pb::ScheduleIdRequest { id: id.to_string() }))
            .await?
            .into_inner();
        Ok(run_from_proto(
            r.run.ok_or(AnswerError::Missing { field: "run" })?,
        )?)
    }

    /// Enables (`true`) or disables a task.
    pub async fn enable_schedule(&self, id: u64, enable: bool) -> Result<TaskView, ClientError> {
        let req = self.req(pb::ScheduleIdRequest { id: id.to_string() });
        let r = if enable {
            self.schedules().enable_schedule(req).await?
        } else {
            self.schedules().disable_schedule(req).await?
        }
        .into_inner();
        need_task(r.task)
    }

    /// Deletes a task and its history.
    pub async fn delete_schedule(&self, id: u64) -> Result<TaskView, ClientError> {
        let r = self
            .schedules()
            .delete_schedule(self.req(pb::ScheduleIdRequest { id: id.to_string() }))
            .await?
            .into_inner();
        need_task(r.task)
    }

    /// A task's runs, newest first (`limit` 0: every run kept).
    pub async fn schedule_history(&self, id: u64, limit: u32) -> Result<Vec<Run>, ClientError> {
        let r = self
            .schedules()
            .schedule_history(self.req(pb::ScheduleHistoryRequest {
                id: id.to_string(),
                limit,
            }))
            .await?
            .into_inner();
        Ok(r.runs
            .into_iter()
            .map(run_from_proto)
            .collect::<Result<_, _>>()?)
    }
}
