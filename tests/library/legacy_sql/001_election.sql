-- pgleader 001: elections, the instance registry, leadership history, and the
-- functions that are the only writers of them. Idempotent.
--
-- Leadership is a session advisory lock pg_advisory_lock(lock_namespace(), lock_id)
-- plus the epoch of the election row. Only the backend that holds that lock can
-- bump the epoch (take_leadership checks pg_locks), and every fenced transaction
-- reads the row FOR SHARE, so a bump and a fenced claim serialise.

create schema if not exists pgleader;

-- The first key of every pgleader advisory lock ('pgld'); the second is the
-- election's lock_id. lock_id 0 is the migration runner's.
create or replace function pgleader.lock_namespace() returns integer
language sql immutable parallel safe as $$ select 1885826148 $$;

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

-- pid of the backend holding an election's lock, or null.
create or replace function pgleader.lock_holder(p_lock_id integer) returns integer
language sql stable as $$
    select l.pid
      from pg_locks l
     where l.locktype = 'advisory' and l.granted
       and l.database = (select oid from pg_database where datname = current_database())
       and l.classid = pgleader.lock_namespace()::oid
       and l.objid = p_lock_id::oid
       and l.objsubid = 2
     limit 1
$$;

create or replace function pgleader.notify_event(
    p_event text, p_election text, p_epoch bigint, p_leader text, p_previous text
) returns void language sql as $$
    select pg_notify('pgleader_events', json_build_object(
        'event', p_event, 'election', p_election, 'epoch', p_epoch,
        'leader', p_leader, 'previous', p_previous, 'at', clock_timestamp())::text)
$$;

-- Called by the lock holder right after pg_advisory_lock returned. Bumps the
-- epoch, records the leader, closes whatever history row a dead predecessor
-- left open, opens ours, and broadcasts. Refuses a caller without the lock.
create or replace function pgleader.take_leadership(
    p_election text, p_instance text, p_host text,
    out epoch bigint, out previous text, out acquired_at timestamptz
) language plpgsql as $$
declare
    e pgleader.election;
    h pgleader.leadership_history;
begin
    select * into e from pgleader.election where name = p_election for update;
    if not found then
        raise exception 'pgleader: unknown election %', p_election using errcode = 'P0002';
    end if;
    if pgleader.lock_holder(e.lock_id) is distinct from pg_backend_pid() then
        raise exception 'pgleader: backend % does not hold the lock of election %',
            pg_backend_pid(), p_election using errcode = '55000';
    end if;
    previous := e.leader;
    for h in
        update pgleader.leadership_history as lh
           set released_at = greatest(now(), lh.acquired_at), release_reason = 'session_ended'
         where lh.election = p_election and lh.released_at is null
        returning lh.*
    loop
        perform pgleader.notify_event('lost', p_election, h.epoch, null, h.instance_id);
    end loop;
    update pgleader.election as el
       set epoch = el.epoch + 1, leader = p_instance, host = p_host,
           backend_pid = pg_backend_pid(), acquired_at = now(), heartbeat_at = now()
     where el.name = p_election
    returning el.epoch, el.acquired_at into epoch, acquired_at;
    insert into pgleader.leadership_history (election, epoch, instance_id, host, backend_pid, acquired_at)
    values (p_election, epoch, p_instance, p_host, pg_backend_pid(), acquired_at);
    update pgleader.instances as i set is_leader = (i.instance_id = p_instance)
     where i.election = p_election and (i.is_leader or i.instance_id = p_instance);
    perform pgleader.notify_event('elected', p_election, epoch, p_instance, previous);
end
$$;

-- The leader's heartbeat: one statement. True only while this backend holds the
-- lock and the epoch is still the caller's; false means "stop acting now".
create or replace function pgleader.heartbeat(p_election text, p_instance text, p_epoch bigint)
returns boolean language plpgsql as $$
declare
    ok boolean;
begin
    update pgleader.election as el set heartbeat_at = now()
     where el.name = p_election and el.epoch = p_epoch and el.leader = p_instance
       and el.backend_pid = pg_backend_pid()
       and pgleader.lock_holder(el.lock_id) = pg_backend_pid();
    ok := found;
    update pgleader.instances as i
       set last_heartbeat = now(), backend_pid = pg_backend_pid(), is_leader = ok
     where i.election = p_election and i.instance_id = p_instance;
    return ok;
end
$$;

-- Graceful hand-over: close our history row with a reason, release the lock,
-- broadcast. The successor's take_leadership waits for this commit (row lock).
create or replace function pgleader.resign(
    p_election text, p_instance text, p_epoch bigint, p_reason text
) returns boolean language plpgsql as $$
declare
    e pgleader.election;
begin
    select * into e from pgleader.election where name = p_election for update;
    if not found or e.epoch <> p_epoch or e.leader <> p_instance
       or e.backend_pid <> pg_backend_pid() then
        return false;
    end if;
    update pgleader.leadership_history as lh
       set released_at = greatest(now(), lh.acquired_at), release_reason = p_reason
     where lh.election = p_election and lh.epoch = p_epoch and lh.released_at is null;
    update pgleader.instances as i set is_leader = false
     where i.election = p_election and i.instance_id = p_instance;
    perform pg_advisory_unlock(pgleader.lock_namespace(), e.lock_id);
    perform pgleader.notify_event('resigned', p_election, p_epoch, null, p_instance);
    return true;
end
$$;

-- A follower's eviction of a hung leader: when the lock holder's heartbeat is
-- older than p_evict_after by the database clock, terminate its backend (which
-- frees the lock), close its history row as evicted and broadcast. Returns the
-- terminated pid, or null when there was nothing to do.
create or replace function pgleader.evict_stale_leader(
    p_election text, p_evict_after interval, p_by text
) returns integer language plpgsql as $$
declare
    e pgleader.election;
    holder integer;
begin
    select * into e from pgleader.election where name = p_election;
    if not found or e.heartbeat_at is null or now() - e.heartbeat_at <= p_evict_after then
        return null;
    end if;
    holder := pgleader.lock_holder(e.lock_id);
    if holder is null or holder is distinct from e.backend_pid then
        return null;  -- nobody holds it (the waiters will get it) or a new leader is mid-bump
    end if;
    perform pg_terminate_backend(holder);
    update pgleader.leadership_history as lh
       set released_at = greatest(now(), lh.acquired_at), release_reason = 'evicted'
     where lh.election = p_election and lh.epoch = e.epoch and lh.released_at is null;
    if found then
        perform pgleader.notify_event('evicted', p_election, e.epoch, p_by, e.leader);
    end if;
    return holder;
end
$$;

-- What an operator reads in psql. leader/host/backend_pid are shown only while
-- that backend really holds the advisory lock (pg_locks), never from the row alone.
create or replace view pgleader.leader as
select e.name                                                 as election,
       e.epoch,
       case when held.pid is not null then e.leader end      as leader,
       case when held.pid is not null then e.host end        as host,
       case when held.pid is not null then e.backend_pid end as backend_pid,
       held.pid is not null                                   as lock_held,
       e.acquired_at,
       e.heartbeat_at,
       clock_timestamp() - e.heartbeat_at                    as heartbeat_age
  from pgleader.election e
  left join lateral (
        select pgleader.lock_holder(e.lock_id) as pid
       ) holder on true
  left join lateral (
        select holder.pid where holder.pid = e.backend_pid
       ) held on true;
comment on view pgleader.leader is
    'Per election: epoch, and the leader only while its backend holds the advisory lock.';

-- A follower's periodic tick while it waits for the lock: refresh its registry
-- row and evict a hung leader if there is one. One round trip.
create or replace function pgleader.follower_beat(
    p_election text, p_instance text, p_evict_after interval
) returns integer language sql as $$
    update pgleader.instances
       set last_heartbeat = now(), backend_pid = pg_backend_pid(), is_leader = false
     where election = p_election and instance_id = p_instance;
    select pgleader.evict_stale_leader(p_election, p_evict_after, p_instance);
$$;

-- Join an election: create its row if needed, (re)register the instance.
create or replace function pgleader.join_election(
    p_election text, p_instance text, p_host text, p_pid integer, p_version text
) returns integer language plpgsql as $$
declare
    id integer;
begin
    insert into pgleader.election (name) values (p_election) on conflict (name) do nothing;
    select lock_id into id from pgleader.election where name = p_election;
    insert into pgleader.instances as i (election, instance_id, host, pid, backend_pid, version)
    values (p_election, p_instance, p_host, p_pid, pg_backend_pid(), p_version)
    on conflict (election, instance_id) do update
       set host = excluded.host, pid = excluded.pid, backend_pid = excluded.backend_pid,
           version = excluded.version, last_heartbeat = now(), is_leader = false,
           started_at = case when i.pid is distinct from excluded.pid then now() else i.started_at end;
    return id;
end
$$;
