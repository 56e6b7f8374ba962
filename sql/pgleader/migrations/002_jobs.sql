-- pgleader 002: the leader's periodic jobs, scheduled from the database.
--
-- One row per job of an election: its schedule, when it is next due, and its
-- last run. The leader registers its jobs when elected and runs each when due;
-- a new leader reads here what its predecessor ran, so a failover neither skips
-- a run (one interrupted or missed is due at once) nor repeats one within its
-- interval. Written only through the functions in ../functions.sql, fenced by
-- the epoch.

create table if not exists pgleader.jobs (
    election        text not null references pgleader.election (name) on delete cascade,
    name            text not null check (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
    schedule        text not null,
    every_s         double precision check (every_s > 0),
    daily_at        time,
    timezone        text not null default 'UTC',
    timeout_s       double precision not null check (timeout_s > 0),
    next_due_at     timestamptz not null,
    -- a manual run asked for (pgleader jobs run), cleared when the run starts
    requested_at    timestamptz,
    requested_by    text,
    -- the run in progress: its epoch, left set by a leader that died mid-run
    running_epoch   bigint,
    running_by      text,
    started_at      timestamptz,
    finished_at     timestamptz,
    outcome         text check (outcome in ('succeeded', 'failed', 'timed_out')),
    result          text,
    duration_s      double precision,
    failures        integer not null default 0,
    last_success_at timestamptz,
    runs            bigint not null default 0,
    primary key (election, name),
    check ((every_s is null) <> (daily_at is null))
);
