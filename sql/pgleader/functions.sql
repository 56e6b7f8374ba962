-- pgleader: the current definition of every function and view of the library.
--
-- Repeatable. `pgleader migrate` applies this file after the versioned migrations
-- (migrations/), again whenever its text is new, in one transaction with its
-- record in pgleader.schema_migrations. So a function is changed here, in place,
-- and never in a migration. Functions also apply again after a versioned file of
-- their stream. Every statement is `create or replace`: what that cannot
-- change (a return type, an argument's name, a view's column) needs a versioned
-- migration that drops the object first. A text applied once and superseded since
-- is not applied again: an older release starting during a rolling upgrade must
-- not undo the newer definitions (to go back, change the text: a comment will do).
--
-- Leadership is a session advisory lock pg_advisory_lock(lock_namespace(), lock_id)
-- plus the epoch of the election row. Only the backend that holds that lock can
-- bump the epoch (claim_leadership checks pg_locks), and every fenced transaction
-- reads the row FOR SHARE (current_epoch), so a bump and a fenced claim serialise.
--
-- Privileges. The instances' role (sql/roles.sql) reads these tables and writes
-- none of them: a change goes through one of the functions marked SECURITY
-- DEFINER, which run with the rights of their owner (the role that ran the
-- migrations), with a fixed search_path (nothing the caller creates is looked up),
-- callable only by the roles they are granted to (never PUBLIC), and each checks
-- for itself what its caller may do (the lock held, the epoch current). The
-- others run with their caller's rights.

-- The first key of every pgleader advisory lock ('pgld'); the second is the
-- election's lock_id. lock_id 0 is the migration runner's.
create or replace function pgleader.lock_namespace() returns integer
language sql immutable parallel safe as $$ select 1885826148 $$;

-- pid of the backend holding an election's lock, or null.
-- plpgsql, not sql, as every function a claim or a beat calls: PostgreSQL (up to 17)
-- plans a SQL-language function's query again at each call that cannot inline it
-- (0.4 ms here, most of a claim's own cost); plpgsql plans it once per session.
create or replace function pgleader.lock_holder(p_lock_id integer) returns integer
language plpgsql stable as $$
begin
    return (
        select l.pid
          from pg_locks l
         where l.locktype = 'advisory' and l.granted
           and l.database = (select oid from pg_database where datname = current_database())
           and l.classid = pgleader.lock_namespace()::oid
           and l.objid = p_lock_id::oid
           and l.objsubid = 2
         limit 1);
end
$$;

create or replace function pgleader.notify_event(
    p_event text, p_election text, p_epoch bigint, p_leader text, p_previous text
) returns void language sql as $$
    select pg_notify('pgleader_events', json_build_object(
        'event', p_event, 'election', p_election, 'epoch', p_epoch,
        'leader', p_leader, 'previous', p_previous, 'at', clock_timestamp())::text)
$$;


-- Fencing ----------------------------------------------------------------------

-- The election's current epoch (null for an unknown election), its row held FOR
-- SHARE until the caller's transaction ends: a new leader's epoch bump waits for
-- the caller, and every read after the bump sees the new epoch. The one fencing
-- read, of check_epoch below and of pgleader/fencing.py.
-- plpgsql, not sql: its plan is made once per session (every claim calls it; a
-- SQL-language function with a SET clause is planned again at each call).
create or replace function pgleader.current_epoch(p_election text) returns bigint
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    found_epoch bigint;
begin
    select e.epoch into found_epoch from pgleader.election e where e.name = p_election for share;
    return found_epoch;
end
$$;
revoke execute on function pgleader.current_epoch(text) from public;

-- The fencing rule for one statement. In autocommit a statement is its own
-- transaction: the row lock taken here holds until everything else the statement
-- writes commits (the same rule as pgleader/fencing.py's check_epoch, without its
-- extra round trips).
create or replace function pgleader.check_epoch(p_election text, p_epoch bigint) returns bigint
language plpgsql as $$
declare
    current_epoch bigint;
begin
    current_epoch := pgleader.current_epoch(p_election);
    if current_epoch is distinct from p_epoch then
        raise exception 'pgleader: election % epoch % is fenced (current epoch is %)',
            p_election, p_epoch, coalesce(current_epoch::text, 'none')
            using errcode = 'PGL01', detail = coalesce(current_epoch::text, ''),
                  hint = 'a newer leader exists: do not act';
    end if;
    return current_epoch;
end
$$;
comment on function pgleader.check_epoch(text, bigint) is
    'Raise SQLSTATE PGL01 unless p_epoch is the current epoch; holds the election row FOR SHARE until commit.';


-- An instance's part in an election (pgleader/election.py) ---------------------

-- Join an election: create its row if needed, (re)register the instance with
-- whether it may lead and its priority (instances.eligible, instances.priority).
create or replace function pgleader.register_instance(
    p_election text, p_instance text, p_host text, p_pid integer, p_version text,
    p_eligible boolean, p_priority integer
) returns integer language plpgsql
security definer set search_path = pg_catalog, pg_temp as $$
declare
    id integer;
begin
    insert into pgleader.election (name) values (p_election) on conflict (name) do nothing;
    select lock_id into id from pgleader.election where name = p_election;
    insert into pgleader.instances as i
           (election, instance_id, host, pid, backend_pid, version, eligible, priority)
    values (p_election, p_instance, p_host, p_pid, pg_backend_pid(), p_version, p_eligible, p_priority)
    on conflict (election, instance_id) do update
       set host = excluded.host, pid = excluded.pid, backend_pid = excluded.backend_pid,
           version = excluded.version, last_heartbeat = now(), is_leader = false,
           eligible = excluded.eligible, priority = excluded.priority,
           started_at = case when i.pid is distinct from excluded.pid then now() else i.started_at end;
    return id;
end
$$;
revoke execute on function pgleader.register_instance(text, text, text, integer, text, boolean, integer) from public;

-- The join of releases before switchover (a rolling upgrade): eligible, priority 0.
create or replace function pgleader.join_election(
    p_election text, p_instance text, p_host text, p_pid integer, p_version text
) returns integer language plpgsql
security definer set search_path = pg_catalog, pg_temp as $$
begin
    return pgleader.register_instance(p_election, p_instance, p_host, p_pid, p_version, true, 0);
end
$$;
revoke execute on function pgleader.join_election(text, text, text, integer, text) from public;

-- The live, eligible instance of an election of the highest priority above
-- p_priority (p_instance aside), or null. Live: its election session is still
-- connected and it beat within p_live_within.
create or replace function pgleader.preferred_candidate(
    p_election text, p_instance text, p_priority integer, p_live_within interval
) returns text language plpgsql stable as $$
begin
    return (
        select i.instance_id
          from pgleader.instances i
         where i.election = p_election and i.instance_id <> p_instance and i.eligible
           and i.priority > p_priority and i.last_heartbeat > clock_timestamp() - p_live_within
           and exists (select from pg_stat_activity a
                        where a.pid = i.backend_pid and a.datname = current_database())
         order by i.priority desc, i.instance_id
         limit 1);
end
$$;

-- Called by the lock holder right after pg_advisory_lock returned (by campaign()
-- below, in the statement that waited; by an older release, in a statement of its
-- own). Bumps the epoch, records the leader, closes whatever history row a dead
-- predecessor left open, opens ours, ends a switchover, and broadcasts. Refuses a
-- caller without the lock, or one registered as not eligible (and releases the lock).
--
-- The lock may not be the caller's to take: while a switchover names another
-- instance (transfer_to, until transfer_until), or, with p_hold_back, while a
-- live eligible instance of higher priority is there to take it. Then nothing
-- changes but the lock, released here: epoch is null and yielded_to names the
-- instance the lock was left to. The named instance itself never holds back.
--
-- p_rehearse: a follower calls it so once per session, long before it may lead. Every
-- statement runs, on no row: nothing is locked, written, released or broadcast, and
-- every output is null. The first call in a session costs several milliseconds more
-- than the next (this function compiled, its statements planned, the catalogs of
-- every table it touches read); rehearsed, a takeover does not pay them between the
-- lock's grant and the bump.
drop function if exists pgleader.claim_leadership(text, text, text, boolean, interval);
create or replace function pgleader.claim_leadership(
    p_election text, p_instance text, p_host text, p_hold_back boolean, p_live_within interval,
    p_rehearse boolean default false,
    out epoch bigint, out previous text, out acquired_at timestamptz, out yielded_to text
) language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    e pgleader.election;
    me pgleader.instances;
    h pgleader.leadership_history;
    holder integer;
    named boolean;
    -- Not now(): called by campaign() below, the statement started before its wait
    -- on the lock, up to a heartbeat ago.
    t timestamptz := clock_timestamp();
begin
    if not p_rehearse then
        -- From here on the session never gives up waiting on a lock (the bump below
        -- waits for fenced transactions, and so may the leader's heartbeats); set here
        -- rather than by a statement of its own, which would stand between the grant
        -- and the bump. A follower that yields sets its lock-wait slice again.
        perform set_config('lock_timeout', '0', false);
    end if;
    select * into e from pgleader.election el
     where el.name = p_election and not p_rehearse for update;
    if not found and not p_rehearse then
        raise exception 'pgleader: unknown election %', p_election using errcode = 'P0002';
    end if;
    holder := pgleader.lock_holder(e.lock_id);
    if holder is distinct from pg_backend_pid() and not p_rehearse then
        raise exception 'pgleader: backend % does not hold the lock of election %',
            pg_backend_pid(), p_election using errcode = '55000';
    end if;
    select * into me from pgleader.instances i
     where i.election = p_election and i.instance_id = p_instance;
    if found and not me.eligible and not p_rehearse then
        perform pg_advisory_unlock(pgleader.lock_namespace(), e.lock_id);  -- not transactional
        raise exception 'pgleader: instance % may not lead election % (it joined as not eligible)',
            p_instance, p_election using errcode = '55000';
    end if;
    named := coalesce(e.transfer_until > t and e.transfer_to is not null, false);
    if named and e.transfer_to <> p_instance then
        yielded_to := e.transfer_to;
    elsif not named and (p_hold_back or p_rehearse) then
        yielded_to := pgleader.preferred_candidate(
            p_election, p_instance, coalesce(me.priority, 0), p_live_within);
    end if;
    if p_rehearse then
        yielded_to := null;
    elsif yielded_to is not null then
        perform pg_advisory_unlock(pgleader.lock_namespace(), e.lock_id);
        return;
    end if;
    previous := e.leader;
    for h in
        update pgleader.leadership_history as lh
           set released_at = greatest(t, lh.acquired_at), release_reason = 'session_ended'
         where lh.election = p_election and lh.released_at is null and not p_rehearse
        returning lh.*
    loop
        perform pgleader.notify_event('lost', p_election, h.epoch, null, h.instance_id);
    end loop;
    update pgleader.election as el
       set epoch = el.epoch + 1, leader = p_instance, host = p_host,
           backend_pid = pg_backend_pid(), acquired_at = t, heartbeat_at = t,
           transfer_to = null, transfer_until = null
     where el.name = p_election and not p_rehearse
    returning el.epoch, el.acquired_at into epoch, acquired_at;
    insert into pgleader.leadership_history (election, epoch, instance_id, host, backend_pid, acquired_at)
    select p_election, epoch, p_instance, p_host, pg_backend_pid(), acquired_at
     where not p_rehearse;
    update pgleader.instances as i set is_leader = (i.instance_id = p_instance)
     where i.election = p_election and (i.is_leader or i.instance_id = p_instance)
       and not p_rehearse;
    if not p_rehearse then
        perform pgleader.notify_event('elected', p_election, epoch, p_instance, previous);
    end if;
end
$$;
revoke execute on function pgleader.claim_leadership(text, text, text, boolean, interval, boolean) from public;

-- The take of releases before switchover (a rolling upgrade): never holds back;
-- epoch is null (and the lock released) while a switchover names another instance.
create or replace function pgleader.take_leadership(
    p_election text, p_instance text, p_host text,
    out epoch bigint, out previous text, out acquired_at timestamptz
) language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    select t.epoch, t.previous, t.acquired_at into epoch, previous, acquired_at
      from pgleader.claim_leadership(p_election, p_instance, p_host, false, null::interval) t;
end
$$;
revoke execute on function pgleader.take_leadership(text, text, text) from public;

-- A follower's wait on the lock and its claim in one statement: blocks on the
-- election's lock (up to the session's lock_timeout, then fails with SQLSTATE 55P03,
-- and the follower beats and waits again), and as soon as the lock is granted runs
-- claim_leadership, on the server: between the grant and the bump there is no round
-- trip to the instance, only this transaction. What it returns is claim_leadership's.
--
-- A session whose instance died while it waited must not be granted the lock and
-- claim for a dead instance: lock sessions run with client_connection_check_interval
-- (pgleader/connect.py, CLIENT_CHECK_MS), so the server ends such a session within that
-- interval of its client's death, in the middle of the wait. Only a death less than an
-- interval before the grant leaves a claim by nobody: that session ends as soon as it
-- answers its dead client, the lock goes to the next waiter, whose claim closes the
-- history row (session_ended), and a dead instance executes nothing.
-- With the caller's rights: the lock needs none, claim_leadership checks its own.
create or replace function pgleader.campaign(
    p_election text, p_instance text, p_host text, p_hold_back boolean, p_live_within interval,
    out epoch bigint, out previous text, out acquired_at timestamptz, out yielded_to text
) language plpgsql as $$
declare
    v_lock integer;
begin
    select el.lock_id into v_lock from pgleader.election el where el.name = p_election;
    if not found then
        raise exception 'pgleader: unknown election %', p_election using errcode = 'P0002';
    end if;
    perform pg_catalog.pg_advisory_lock(pgleader.lock_namespace(), v_lock);
    select c.epoch, c.previous, c.acquired_at, c.yielded_to
      into epoch, previous, acquired_at, yielded_to
      from pgleader.claim_leadership(p_election, p_instance, p_host, p_hold_back, p_live_within) c;
end
$$;

-- The leader's heartbeat: one statement. held is true only while this backend
-- holds the lock and the epoch is still the caller's; false means "stop acting
-- now". transfer_to names the instance a switchover hands the lead to, while one
-- in force names another: the leader then finishes its work and resigns.
create or replace function pgleader.leader_heartbeat(
    p_election text, p_instance text, p_epoch bigint, out held boolean, out transfer_to text
) language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    update pgleader.election as el set heartbeat_at = now()
     where el.name = p_election and el.epoch = p_epoch and el.leader = p_instance
       and el.backend_pid = pg_backend_pid()
       and pgleader.lock_holder(el.lock_id) = pg_backend_pid()
    returning case when el.transfer_until > now() and el.transfer_to <> p_instance
                   then el.transfer_to end
         into transfer_to;
    held := found;
    update pgleader.instances as i
       set last_heartbeat = now(), backend_pid = pg_backend_pid(), is_leader = held
     where i.election = p_election and i.instance_id = p_instance;
end
$$;
revoke execute on function pgleader.leader_heartbeat(text, text, bigint) from public;

-- The heartbeat of releases before switchover (a rolling upgrade): held only.
create or replace function pgleader.heartbeat(p_election text, p_instance text, p_epoch bigint)
returns boolean language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    return (select b.held from pgleader.leader_heartbeat(p_election, p_instance, p_epoch) b);
end
$$;
revoke execute on function pgleader.heartbeat(text, text, bigint) from public;

-- A switchover: name the instance that alone may take the lock next, for
-- p_bound from now (then anyone may again: a target that died never leaves the
-- election leaderless). The leader sees it on its next heartbeat and resigns. A
-- leader asking for itself passes its epoch (fenced); an operator passes null.
-- Returns null when done, else why not, in one line: the target is unknown, not
-- alive (its election session gone, or no beat within p_live_within), may not
-- lead, or already leads; nobody leads; or p_epoch is not current.
create or replace function pgleader.request_transfer(
    p_election text, p_to text, p_epoch bigint, p_live_within interval, p_bound interval
) returns text language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    e pgleader.election;
    target pgleader.instances;
    holder integer;
begin
    select * into e from pgleader.election where name = p_election for update;
    if not found then
        return format('no election %s', p_election);
    end if;
    if p_epoch is not null and e.epoch <> p_epoch then
        return format('epoch %s is not current (%s): this instance no longer leads', p_epoch, e.epoch);
    end if;
    holder := pgleader.lock_holder(e.lock_id);
    if holder is null or holder is distinct from e.backend_pid then
        return format('nobody leads election %s: there is no leadership to hand over', p_election);
    end if;
    select * into target from pgleader.instances i
     where i.election = p_election and i.instance_id = p_to;
    if not found then
        return format('no instance %s in election %s', p_to, p_election);
    end if;
    if e.leader = p_to then
        return format('instance %s already leads', p_to);
    end if;
    if not target.eligible then
        return format('instance %s may not lead (it runs with --no-lead)', p_to);
    end if;
    if target.last_heartbeat <= now() - p_live_within
       or not exists (select from pg_stat_activity a
                       where a.pid = target.backend_pid and a.datname = current_database()) then
        return format('instance %s is not alive (last heartbeat %s s ago)', p_to,
                      round(extract(epoch from now() - target.last_heartbeat)::numeric, 1));
    end if;
    update pgleader.election set transfer_to = p_to, transfer_until = now() + p_bound
     where name = p_election;
    return null;
end
$$;
revoke execute on function pgleader.request_transfer(text, text, bigint, interval, interval) from public;

-- Graceful hand-over: close our history row with a reason, release the lock,
-- broadcast. The successor's claim_leadership waits for this commit (row lock).
create or replace function pgleader.resign(
    p_election text, p_instance text, p_epoch bigint, p_reason text
) returns boolean language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
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
revoke execute on function pgleader.resign(text, text, bigint, text) from public;

-- The record of an eviction (evict_stale_leader below ends the session): when the
-- lock holder's heartbeat is older than p_evict_after by the database clock, close
-- its history row as evicted and broadcast. Returns the backend pid to terminate,
-- or null when there is nothing to do.
--
-- A holder that is not the leader of the row is a waiter the lock was granted to and
-- that has not bumped the epoch yet: mid-bump, or stopped right after its wait (its
-- process paused, a frozen VM: the server granted the lock to a session whose kernel
-- still answers keepalives, and nobody would ever lead). Evicted too once its last
-- follower beat is older than p_evict_after (a waiter beats every heartbeat until it
-- is granted the lock; its claim ends within a lease, blockers terminated), broadcast
-- as evicted with no epoch.
create or replace function pgleader.record_eviction(
    p_election text, p_evict_after interval, p_by text
) returns integer language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    e pgleader.election;
    holder integer;
    stuck text;
    beat timestamptz;
begin
    select * into e from pgleader.election where name = p_election;
    -- (no leader yet, heartbeat_at null: a waiter granted the lock may be stuck)
    if not found or now() - e.heartbeat_at <= p_evict_after then
        return null;
    end if;
    holder := pgleader.lock_holder(e.lock_id);
    if holder is null then
        return null;  -- nobody holds it: the waiters will get it
    end if;
    if holder is distinct from e.backend_pid then
        select i.instance_id, i.last_heartbeat into stuck, beat from pgleader.instances i
         where i.election = p_election and i.backend_pid = holder
         order by i.last_heartbeat desc limit 1;  -- (a dead instance's row may name a reused pid)
        if not found or beat >= now() - p_evict_after then
            return null;  -- a new leader mid-bump (or a session not of an instance)
        end if;
        perform pgleader.notify_event('evicted', p_election, null, p_by, stuck);
        return holder;
    end if;
    update pgleader.leadership_history as lh
       set released_at = greatest(now(), lh.acquired_at), release_reason = 'evicted'
     where lh.election = p_election and lh.epoch = e.epoch and lh.released_at is null;
    if found then
        perform pgleader.notify_event('evicted', p_election, e.epoch, p_by, e.leader);
    end if;
    return holder;
end
$$;
revoke execute on function pgleader.record_eviction(text, interval, text) from public;

-- A follower's eviction of a hung leader: record it, then terminate the leader's
-- backend, which frees the lock. Returns the terminated pid, or null when there was
-- nothing to do. The termination runs with the caller's own rights, on purpose: a
-- role may end the sessions of its own role only, so instances that all log in as
-- one role evict each other and nobody else (run as the owner it could end more).
create or replace function pgleader.evict_stale_leader(
    p_election text, p_evict_after interval, p_by text
) returns integer language plpgsql as $$
declare
    holder integer;
begin
    holder := pgleader.record_eviction(p_election, p_evict_after, p_by);
    if holder is not null then
        perform pg_terminate_backend(holder);
    end if;
    return holder;
end
$$;

-- A follower's registry row: alive, not leading.
create or replace function pgleader.record_follower_beat(p_election text, p_instance text)
returns void language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    update pgleader.instances
       set last_heartbeat = now(), backend_pid = pg_backend_pid(), is_leader = false
     where election = p_election and instance_id = p_instance;
end
$$;
revoke execute on function pgleader.record_follower_beat(text, text) from public;

-- A follower's periodic tick while it waits for the lock: refresh its registry
-- row and evict a hung leader if there is one. One round trip.
create or replace function pgleader.follower_beat(
    p_election text, p_instance text, p_evict_after interval
) returns integer language plpgsql as $$
begin
    perform pgleader.record_follower_beat(p_election, p_instance);
    return pgleader.evict_stale_leader(p_election, p_evict_after, p_instance);
end
$$;


-- What an operator reads ------------------------------------------------------

-- leader/host/backend_pid are shown only while that backend really holds the
-- advisory lock (pg_locks), never from the row alone; transfer_to/transfer_until
-- only while a switchover is in force.
create or replace view pgleader.leader as
select e.name                                                 as election,
       e.epoch,
       case when held.pid is not null then e.leader end      as leader,
       case when held.pid is not null then e.host end        as host,
       case when held.pid is not null then e.backend_pid end as backend_pid,
       held.pid is not null                                   as lock_held,
       e.acquired_at,
       e.heartbeat_at,
       clock_timestamp() - e.heartbeat_at                    as heartbeat_age,
       case when e.transfer_until > now() then e.transfer_to end as transfer_to,
       case when e.transfer_until > now() then e.transfer_until end as transfer_until
  from pgleader.election e
  left join lateral (
        select pgleader.lock_holder(e.lock_id) as pid
       ) holder on true
  left join lateral (
        select holder.pid where holder.pid = e.backend_pid
       ) held on true;
comment on view pgleader.leader is
    'Per election: epoch, and the leader only while its backend holds the advisory lock.';


-- The leader's jobs (pgleader/jobs.py) -------------------------------------------

-- When a job is due next after `p_after`: every N seconds, or daily at a local
-- time of a time zone (by the database's clock, as every schedule here).
create or replace function pgleader.job_next_due(
    p_every_s double precision, p_daily_at time, p_timezone text, p_after timestamptz
) returns timestamptz language plpgsql stable as $$
declare
    local_day date;
    candidate timestamptz;
begin
    if p_every_s is not null then
        return p_after + make_interval(secs => p_every_s);
    end if;
    local_day := (p_after at time zone p_timezone)::date;
    candidate := (local_day + p_daily_at) at time zone p_timezone;
    if candidate <= p_after then
        candidate := (local_day + 1 + p_daily_at) at time zone p_timezone;
    end if;
    return candidate;
end
$$;

-- The leader's registration of a job when elected. A new job is due at once (an
-- interval job) or at its next daily time; a changed schedule counts from the
-- last start. Fenced: only the current leader defines the schedule.
create or replace function pgleader.register_job(
    p_election text, p_epoch bigint, p_name text, p_every_s double precision,
    p_daily_at time, p_timezone text, p_timeout_s double precision
) returns void language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    described text := case when p_every_s is not null then format('every %s s', p_every_s)
                           else format('daily %s %s', to_char(p_daily_at, 'HH24:MI'), p_timezone) end;
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    insert into pgleader.jobs as j
           (election, name, schedule, every_s, daily_at, timezone, timeout_s, next_due_at)
    values (p_election, p_name, described, p_every_s, p_daily_at, p_timezone, p_timeout_s,
            case when p_every_s is not null then now()
                 else pgleader.job_next_due(null, p_daily_at, p_timezone, now()) end)
    on conflict (election, name) do update
       set schedule = excluded.schedule, every_s = excluded.every_s,
           daily_at = excluded.daily_at, timezone = excluded.timezone,
           timeout_s = excluded.timeout_s,
           next_due_at = case when j.schedule = excluded.schedule then j.next_due_at
                              else pgleader.job_next_due(excluded.every_s, excluded.daily_at,
                                   excluded.timezone, coalesce(j.started_at, now())) end;
end
$$;
revoke execute on function pgleader.register_job(text, bigint, text, double precision, time, text, double precision) from public;

-- Start a job's run if it is due: its time has come, a run was asked for, or a
-- run of an earlier epoch never finished (its leader died: run it again now).
-- Moves the next due time past this start, so no leader runs it again within its
-- interval. True when the caller must run it. Fenced.
create or replace function pgleader.start_job(
    p_election text, p_epoch bigint, p_instance text, p_name text
) returns boolean language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    update pgleader.jobs as j
       set running_epoch = p_epoch, running_by = p_instance, started_at = now(),
           requested_at = null,
           next_due_at = pgleader.job_next_due(j.every_s, j.daily_at, j.timezone, now())
     where j.election = p_election and j.name = p_name
       and j.running_epoch is distinct from p_epoch
       and (j.next_due_at <= now() or j.requested_at is not null or j.running_epoch is not null);
    return found;
end
$$;
revoke execute on function pgleader.start_job(text, bigint, text, text) from public;

-- Record the end of a run. A failure is counted and due again after a backoff
-- (p_retry_s doubled for each failure before it, at most an hour; never later
-- than its regular time); a success clears the count. Fenced: a demoted leader's late result is not recorded (its successor
-- runs the job again). Returns the consecutive failures.
create or replace function pgleader.finish_job(
    p_election text, p_epoch bigint, p_name text, p_outcome text, p_result text,
    p_duration_s double precision, p_retry_s double precision
) returns integer language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    failed integer;
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    update pgleader.jobs as j
       set running_epoch = null, finished_at = now(), outcome = p_outcome,
           result = left(p_result, 500), duration_s = p_duration_s, runs = j.runs + 1,
           failures = case when p_outcome = 'succeeded' then 0 else j.failures + 1 end,
           last_success_at = case when p_outcome = 'succeeded' then now() else j.last_success_at end,
           next_due_at = case when p_outcome = 'succeeded' then j.next_due_at
                              else least(j.next_due_at, now() + make_interval(
                                   secs => least(p_retry_s * power(2, least(j.failures, 20)), 3600))) end
     where j.election = p_election and j.name = p_name and j.running_epoch = p_epoch
    returning j.failures into failed;
    if failed > 0 then
        perform pg_notify('pgleader_events', json_build_object(
            'event', 'job_failed', 'election', p_election, 'epoch', p_epoch, 'job', p_name,
            'outcome', p_outcome, 'failures', failed, 'at', clock_timestamp())::text);
    end if;
    return coalesce(failed, 0);
end
$$;
revoke execute on function pgleader.finish_job(text, bigint, text, text, text, double precision, double precision) from public;

-- Ask for a run now (any instance, the CLI): the leader starts it within its
-- poll interval. The time of the request, or null for an unknown job.
create or replace function pgleader.request_job(p_election text, p_name text, p_by text)
returns timestamptz language sql security definer set search_path = pg_catalog, pg_temp as $$
    update pgleader.jobs set requested_at = coalesce(requested_at, now()), requested_by = p_by
     where election = p_election and name = p_name
    returning requested_at
$$;
revoke execute on function pgleader.request_job(text, text, text) from public;

-- Remove instances not seen for p_older_than from the registry (never the
-- leader); the leadership history keeps them. Fenced. Returns the removed ids.
create or replace function pgleader.prune_instances(
    p_election text, p_epoch bigint, p_older_than interval
) returns setof text language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    perform pgleader.check_epoch(p_election, p_epoch);
    return query
        delete from pgleader.instances i
         where i.election = p_election and not i.is_leader
           and i.last_heartbeat < now() - p_older_than
        returning i.instance_id;
end
$$;
revoke execute on function pgleader.prune_instances(text, bigint, interval) from public;

-- What an operator reads: every job, when it runs next, how its last run went.
create or replace view pgleader.job_status as
select j.election,
       j.name                                   as job,
       j.schedule,
       j.next_due_at,
       greatest(j.next_due_at - now(), interval '0') as due_in,
       j.running_epoch is not null              as running,
       j.running_by,
       j.started_at,
       j.finished_at,
       j.outcome,
       j.duration_s,
       j.failures,
       j.last_success_at,
       j.runs,
       j.requested_at,
       j.result
  from pgleader.jobs j;
comment on view pgleader.job_status is
    'The leader''s periodic jobs: schedule, next due time, the last run and its outcome.';
