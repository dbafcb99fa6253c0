//! The changeover as a pure state machine: events in, actions out, no I/O.
//!
//! The driver (`driver.rs`) performs the actions and feeds their results back as events;
//! the journal records the phase before each action is taken. Keeping the decisions here
//! makes every transition, and every illegal one, testable without sockets or files.

use changeover_protocol::{ChangeoverOutcome, ChangeoverPhase};

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An admin asked for a changeover, now or at a later time.
    Requested {
        scheduled: bool,
    },
    /// A scheduled changeover's time has come.
    StartTimeReached,
    /// Every preflight check passed: release verified and unpacked, self-check, rights, space.
    Prepared,
    /// A preflight check failed; nobody was disturbed.
    PrepareFailed(String),
    CancelRequested,
    DeadlineReached,
    LoggedOut,
    Stopped,
    CarriedOver,
    Swapped,
    /// The process runs as the new release.
    Restarted,
    Healthy,
    Unhealthy(String),
    /// A step after the logout failed; what was done must be undone.
    StepFailed(String),
    RolledBack,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Prepare,
    StartCountdown,
    AnnounceCancel,
    LogOutSessions,
    Stop,
    CarryOver,
    Swap,
    Restart,
    CheckHealth,
    Commit,
    RollBack(String),
    Finish(ChangeoverOutcome, Option<String>),
}

/// An event that cannot happen in a phase, or may not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event:?} is not possible while {phase}: {reason}")]
pub struct IllegalTransition {
    pub phase: ChangeoverPhase,
    pub event: Event,
    pub reason: &'static str,
}

/// The next phase and the actions to take, or why the event is refused.
pub fn step(
    phase: ChangeoverPhase,
    event: Event,
) -> Result<(ChangeoverPhase, Vec<Action>), IllegalTransition> {
    use Action as A;
    use ChangeoverPhase as P;
    use Event as E;
    let next = match (phase, &event) {
        (P::Idle, E::Requested { scheduled: true }) => (P::Scheduled, vec![]),
        (P::Idle, E::Requested { scheduled: false }) => (P::Preparing, vec![A::Prepare]),
        (P::Scheduled, E::StartTimeReached) => (P::Preparing, vec![A::Prepare]),
        (P::Scheduled | P::Preparing, E::CancelRequested) => {
            (P::Idle, vec![A::Finish(ChangeoverOutcome::Cancelled, None)])
        }
        (P::Preparing, E::Prepared) => (P::CountingDown, vec![A::StartCountdown]),
        (P::Preparing, E::PrepareFailed(reason) | E::StepFailed(reason)) => (
            P::Idle,
            vec![A::Finish(ChangeoverOutcome::Failed, Some(reason.clone()))],
        ),
        (P::CountingDown, E::CancelRequested) => (
            P::Idle,
            vec![
                A::AnnounceCancel,
                A::Finish(ChangeoverOutcome::Cancelled, None),
            ],
        ),
        (P::CountingDown, E::DeadlineReached) => (P::LoggingOut, vec![A::LogOutSessions]),
        (P::LoggingOut, E::LoggedOut) => (P::Stopping, vec![A::Stop]),
        (P::Stopping, E::Stopped) => (P::CarryingOver, vec![A::CarryOver]),
        (P::CarryingOver, E::CarriedOver) => (P::Swapping, vec![A::Swap]),
        (P::Swapping, E::Swapped) => (P::Restarting, vec![A::Restart]),
        (P::Restarting, E::Restarted) => (P::HealthCheck, vec![A::CheckHealth]),
        (P::HealthCheck, E::Healthy) => (
            P::Idle,
            vec![A::Commit, A::Finish(ChangeoverOutcome::Committed, None)],
        ),
        (P::HealthCheck, E::Unhealthy(reason)) => {
            (P::RollingBack, vec![A::RollBack(reason.clone())])
        }
        (
            P::CountingDown
            | P::LoggingOut
            | P::Stopping
            | P::CarryingOver
            | P::Swapping
            | P::Restarting
            | P::HealthCheck,
            E::StepFailed(reason),
        ) => (P::RollingBack, vec![A::RollBack(reason.clone())]),
        (P::RollingBack, E::RolledBack) => (P::Idle, vec![]),
        (
            P::LoggingOut
            | P::Stopping
            | P::CarryingOver
            | P::Swapping
            | P::Restarting
            | P::HealthCheck
            | P::RollingBack,
            E::CancelRequested,
        ) => {
            return Err(IllegalTransition {
                phase,
                event,
                reason: "too late to cancel: the sessions have been logged out",
            });
        }
        (P::Idle, E::CancelRequested) => {
            return Err(IllegalTransition {
                phase,
                event,
                reason: "no changeover is scheduled or running",
            });
        }
        (_, E::Requested { .. }) => {
            return Err(IllegalTransition {
                phase,
                event,
                reason: "another changeover is already under way",
            });
        }
        (P::Idle, _) => {
            return Err(IllegalTransition {
                phase,
                event,
                reason: "no changeover is running",
            });
        }
        _ => {
            return Err(IllegalTransition {
                phase,
                event,
                reason: "out of order",
            });
        }
    };
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChangeoverPhase as P;

    fn run(events: Vec<Event>) -> (ChangeoverPhase, Vec<Action>) {
        let mut phase = P::Idle;
        let mut actions = Vec::new();
        for event in events {
            let (next, mut taken) = step(phase, event).unwrap();
            phase = next;
            actions.append(&mut taken);
        }
        (phase, actions)
    }

    #[test]
    fn the_whole_way_ends_committed() {
        let (phase, actions) = run(vec![
            Event::Requested { scheduled: false },
            Event::Prepared,
            Event::DeadlineReached,
            Event::LoggedOut,
            Event::Stopped,
            Event::CarriedOver,
            Event::Swapped,
            Event::Restarted,
            Event::Healthy,
        ]);
        assert_eq!(phase, P::Idle);
        assert_eq!(
            actions,
            vec![
                Action::Prepare,
                Action::StartCountdown,
                Action::LogOutSessions,
                Action::Stop,
                Action::CarryOver,
                Action::Swap,
                Action::Restart,
                Action::CheckHealth,
                Action::Commit,
                Action::Finish(ChangeoverOutcome::Committed, None),
            ]
        );
    }

    #[test]
    fn a_scheduled_changeover_waits_for_its_time() {
        let (phase, actions) = run(vec![Event::Requested { scheduled: true }]);
        assert_eq!((phase, actions), (P::Scheduled, vec![]));
        let (phase, actions) = step(P::Scheduled, Event::StartTimeReached).unwrap();
        assert_eq!((phase, actions), (P::Preparing, vec![Action::Prepare]));
    }

    #[test]
    fn a_failed_preflight_disturbs_nobody() {
        let (phase, actions) = run(vec![
            Event::Requested { scheduled: false },
            Event::PrepareFailed("no space".to_owned()),
        ]);
        assert_eq!(phase, P::Idle);
        assert_eq!(
            actions,
            vec![
                Action::Prepare,
                Action::Finish(ChangeoverOutcome::Failed, Some("no space".to_owned()))
            ]
        );
        assert!(!actions.contains(&Action::StartCountdown));
    }

    #[test]
    fn cancel_is_possible_until_the_deadline_and_refused_after() {
        for phase in [P::Scheduled, P::Preparing] {
            let (next, actions) = step(phase, Event::CancelRequested).unwrap();
            assert_eq!(next, P::Idle);
            assert_eq!(
                actions,
                vec![Action::Finish(ChangeoverOutcome::Cancelled, None)]
            );
        }
        let (next, actions) = step(P::CountingDown, Event::CancelRequested).unwrap();
        assert_eq!(next, P::Idle);
        assert_eq!(actions[0], Action::AnnounceCancel);
        for phase in [
            P::LoggingOut,
            P::Stopping,
            P::CarryingOver,
            P::Swapping,
            P::Restarting,
            P::HealthCheck,
            P::RollingBack,
        ] {
            let err = step(phase, Event::CancelRequested).unwrap_err();
            assert!(err.reason.contains("too late"), "{phase}: {err}");
        }
        assert!(step(P::Idle, Event::CancelRequested).is_err());
    }

    #[test]
    fn failures_after_the_logout_roll_back() {
        for phase in [
            P::CountingDown,
            P::LoggingOut,
            P::Stopping,
            P::CarryingOver,
            P::Swapping,
            P::Restarting,
            P::HealthCheck,
        ] {
            let (next, actions) = step(phase, Event::StepFailed("disk".to_owned())).unwrap();
            assert_eq!(next, P::RollingBack, "{phase}");
            assert_eq!(actions, vec![Action::RollBack("disk".to_owned())]);
        }
        let (next, actions) = step(P::HealthCheck, Event::Unhealthy("no".to_owned())).unwrap();
        assert_eq!(
            (next, actions),
            (P::RollingBack, vec![Action::RollBack("no".to_owned())])
        );
        assert_eq!(
            step(P::RollingBack, Event::RolledBack).unwrap(),
            (P::Idle, vec![])
        );
    }

    #[test]
    fn out_of_order_events_are_illegal() {
        let every_event = [
            Event::Requested { scheduled: false },
            Event::StartTimeReached,
            Event::Prepared,
            Event::PrepareFailed(String::new()),
            Event::CancelRequested,
            Event::DeadlineReached,
            Event::LoggedOut,
            Event::Stopped,
            Event::CarriedOver,
            Event::Swapped,
            Event::Restarted,
            Event::Healthy,
            Event::Unhealthy(String::new()),
            Event::StepFailed(String::new()),
            Event::RolledBack,
        ];
        let every_phase = [
            P::Idle,
            P::Scheduled,
            P::Preparing,
            P::CountingDown,
            P::LoggingOut,
            P::Stopping,
            P::CarryingOver,
            P::Swapping,
            P::Restarting,
            P::HealthCheck,
            P::RollingBack,
        ];
        // The legal pairs, exactly; everything else must be refused.
        let legal = |phase: P, event: &Event| {
            matches!(
                (phase, event),
                (P::Idle, Event::Requested { .. })
                    | (
                        P::Scheduled,
                        Event::StartTimeReached | Event::CancelRequested
                    )
                    | (
                        P::Preparing,
                        Event::Prepared
                            | Event::PrepareFailed(_)
                            | Event::StepFailed(_)
                            | Event::CancelRequested
                    )
                    | (
                        P::CountingDown,
                        Event::CancelRequested | Event::DeadlineReached | Event::StepFailed(_)
                    )
                    | (P::LoggingOut, Event::LoggedOut | Event::StepFailed(_))
                    | (P::Stopping, Event::Stopped | Event::StepFailed(_))
                    | (P::CarryingOver, Event::CarriedOver | Event::StepFailed(_))
                    | (P::Swapping, Event::Swapped | Event::StepFailed(_))
                    | (P::Restarting, Event::Restarted | Event::StepFailed(_))
                    | (
                        P::HealthCheck,
                        Event::Healthy | Event::Unhealthy(_) | Event::StepFailed(_)
                    )
                    | (P::RollingBack, Event::RolledBack)
            )
        };
        for phase in every_phase {
            for event in &every_event {
                let result = step(phase, event.clone());
                assert_eq!(
                    result.is_ok(),
                    legal(phase, event),
                    "{phase} + {event:?}: {result:?}"
                );
            }
        }
    }
}
