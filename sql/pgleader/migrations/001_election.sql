-- pgleader 001: elections, the instance registry and the leadership history.
--
-- The tables only; the functions that are the only writers of them, and the
-- operator's view, are in ../functions.sql. Idempotent: a database of the 0.1
-- layout (sql/001-006, before the streams) has these tables already, exactly
-- so, and this file leaves them as they are.

create schema if not exists pgleader;

create table if not exists pgleader.election (
    name         text primary key check (name <> '' and length(name) <= 200),
    lock_id      integer generated always as identity (start with 1) unique,
    epoch        bigint not null default 0 check (epoch >= 0),
    leader       text,
    host         text,
    backend_pid  integer,
    acquired_at  timestamptz,
    heartbeat_at timestamptz
);
comment on table pgleader.election is
    'One row per election. epoch only ever grows; leader columns describe the holder of epoch.';

create table if not exists pgleader.instances (
    election       text not null references pgleader.election (name) on delete cascade,
    instance_id    text not null,
    host           text,
    pid            integer,
    backend_pid    integer,
    version        text,
    started_at     timestamptz not null default now(),
    last_heartbeat timestamptz not null default now(),
    is_leader      boolean not null default false,
    primary key (election, instance_id)
);
create index if not exists instances_last_heartbeat_idx on pgleader.instances (last_heartbeat);

create table if not exists pgleader.leadership_history (
    id             bigint generated always as identity primary key,
    election       text not null references pgleader.election (name) on delete cascade,
    epoch          bigint not null,
    instance_id    text not null,
    host           text,
    backend_pid    integer,
    acquired_at    timestamptz not null,
    released_at    timestamptz,
    duration       interval generated always as (released_at - acquired_at) stored,
    release_reason text,
    -- the bump's transaction: with track_commit_timestamp, when this epoch became current
    acquired_txid  bigint not null default txid_current(),
    unique (election, epoch),
    check (released_at is null or released_at >= acquired_at)
);
create index if not exists leadership_history_timeline_idx
    on pgleader.leadership_history (election, acquired_at);
create index if not exists leadership_history_instance_idx
    on pgleader.leadership_history (instance_id, acquired_at);
