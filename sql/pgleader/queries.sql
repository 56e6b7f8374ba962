-- Every statement the pgleader library runs, by name (loaded by pgleader/queries.py).
--
-- Each query starts at a `-- name: <name>` line; the comment lines right after it
-- say what it is for, the rest up to the next header is the statement. Values are
-- psycopg placeholders (%s, %(name)s), never text put into the statement.
-- The pgleader.* functions called here are defined in functions.sql, next to this file.


-- The elector (pgleader/election.py) -------------------------------------------

-- name: join_election
-- Register this instance (eligible to lead or not, its priority); returns the
-- election's advisory lock id.
select pgleader.register_instance(%s, %s, %s, %s, %s, %s, %s);

-- name: set_lock_timeout
-- A follower waits on the lock in slices of one heartbeat (the value, e.g. '1000ms'),
-- so that it also polls for a hung leader.
select set_config('lock_timeout', %s, false);

-- name: follower_beat
-- A follower's beat while the lock is taken: evicts a leader silent for longer
-- than the interval; returns the evicted backend's pid, or null.
select pgleader.follower_beat(%s, %s, make_interval(secs => %s));

-- name: rehearse_claim
-- Once per session of an instance that may lead: claim_leadership run on no row (it
-- changes nothing), so that the takeover finds it compiled and planned.
select epoch from pgleader.claim_leadership(%s, %s, %s, true, make_interval(secs => %s), true);

-- name: campaign
-- A follower waits on the election's lock (up to lock_timeout: SQLSTATE 55P03) and,
-- once it is granted, bumps the epoch in the same statement: returns the new epoch and
-- the previous leader. When the lock is not its to take (a switchover names another
-- instance; or, holding back, a live eligible instance of higher priority beat within
-- the given seconds), the lock is released instead: epoch null, and the instance left to.
select epoch, previous, yielded_to
  from pgleader.campaign(%s, %s, %s, %s, make_interval(secs => %s));

-- name: terminate_blockers
-- End the sessions that keep the epoch bump (the given backend) waiting.
select pid, pg_terminate_backend(pid) from unnest(pg_blocking_pids(%s)) pid;

-- name: heartbeat
-- held: true while this session holds the lock and its epoch is current;
-- transfer_to: the instance a switchover hands the lead to (then resign), or null.
select held, transfer_to from pgleader.leader_heartbeat(%s, %s, %s);

-- name: request_transfer
-- Name the instance that alone may take the lock next (election, target, the
-- asking leader's epoch or null, live within s, for s): null, or why not.
select pgleader.request_transfer(%s, %s, %s, make_interval(secs => %s), make_interval(secs => %s));

-- name: resign
-- Close this leadership's history row with a reason and release the lock.
select pgleader.resign(%s, %s, %s, %s);


-- Fencing (pgleader/fencing.py) ------------------------------------------------

-- name: read_epoch_for_share
-- check_epoch: the election's current epoch, its row locked until the caller's
-- commit, so that a new leader's epoch bump waits for the caller. Through the
-- function (its owner's rights): the instances' role may not lock the row itself.
-- No row for an unknown election.
select epoch from pgleader.current_epoch(%s) as epoch where epoch is not null;


-- Listening (pgleader/events.py) -----------------------------------------------

-- name: ping
-- Proves a quiet listening connection is alive.
select 1;


-- The CLI (pgleader/cli.py) ----------------------------------------------------

-- name: leaders
-- `pgleader status`: one row per election.
select election, epoch, leader, host, backend_pid, lock_held, acquired_at,
       extract(epoch from heartbeat_age)::float8 as heartbeat_age_s
  from pgleader.leader order by election;

-- name: job_list
-- `pgleader jobs`: every job of an election (all elections when null).
select election, job, schedule, next_due_at,
       extract(epoch from due_in)::float8 as due_in_s, running, running_by, started_at,
       finished_at, outcome, duration_s, failures, last_success_at, runs, requested_at, result
  from pgleader.job_status
 where %(election)s::text is null or election = %(election)s
 order by election, job;

-- name: request_job
-- `pgleader jobs run`: ask the leader for a run now; null for an unknown job.
select pgleader.request_job(%s, %s, %s);

-- name: job_run_state
-- Whether a run asked for at a time has finished: its outcome then.
select requested_at is null and running_epoch is null and finished_at >= %s as done,
       outcome, result, duration_s, started_at, finished_at
  from pgleader.jobs where election = %s and name = %s;


-- name: leadership_timeline
-- `pgleader history`: an election's terms, oldest first: the latest %(limit)s of
-- those still on at the since bound (since_at a time, since_s seconds back by this
-- clock; both null: every term). reason 'leading' for the term whose leader holds
-- the lock now; null for one that ended without a word yet (its successor closes it).
select h.epoch, h.instance_id as leader, h.host, h.acquired_at as "from", h.released_at as "to",
       extract(epoch from coalesce(h.duration, clock_timestamp() - h.acquired_at))::float8
           as duration_s,
       coalesce(h.release_reason,
                case when l.lock_held and l.epoch = h.epoch then 'leading' end) as reason
  from (select * from pgleader.leadership_history x
         where x.election = %(election)s
           and (%(since_at)s::timestamptz is null
                or coalesce(x.released_at, 'infinity') >= %(since_at)s)
           and (%(since_s)s::float8 is null
                or coalesce(x.released_at, 'infinity')
                   >= clock_timestamp() - make_interval(secs => %(since_s)s))
         order by x.epoch desc limit %(limit)s) h
  left join pgleader.leader l on l.election = h.election
 order by h.epoch;

-- name: instance_list
-- `pgleader instances`: an election's registry; stale when its last heartbeat is
-- older than stale_after seconds; leader only while it holds the lock; whether it
-- may lead and its priority.
select i.instance_id, i.host, i.pid, i.version, coalesce(l.leader = i.instance_id, false) as leader,
       extract(epoch from clock_timestamp() - i.last_heartbeat)::float8 as heartbeat_age_s,
       clock_timestamp() - i.last_heartbeat > make_interval(secs => %(stale_after)s) as stale,
       i.started_at, i.last_heartbeat, i.eligible, i.priority
  from pgleader.instances i
  left join pgleader.leader l on l.election = i.election
 where i.election = %(election)s
 order by i.instance_id;

-- name: election_state
-- `pgleader transfer`: who leads an election now, and the switchover in force.
select leader, epoch, transfer_to from pgleader.leader where election = %s;

-- The job runner (pgleader/jobs.py) ----------------------------------------------

-- name: register_job
-- The leader's registration of one job (fenced).
select pgleader.register_job(%s, %s, %s, %s, %s, %s, %s);

-- name: due_jobs
-- The runner's poll: each job of the list, whether it is due now (as start_job
-- decides), and seconds until it is due otherwise.
select name,
       next_due_at <= now() or requested_at is not null
           or (running_epoch is not null and running_epoch <> %(epoch)s) as due,
       greatest(extract(epoch from next_due_at - now()), 0)::float8 as due_in_s,
       extract(epoch from now() - last_success_at)::float8 as since_success_s
  from pgleader.jobs
 where election = %(election)s and name = any(%(names)s);

-- name: start_job
-- Start a due job's run; false when it is not due (or already running).
select pgleader.start_job(%s, %s, %s, %s);

-- name: finish_job
-- Record a run's end; returns the consecutive failures.
select pgleader.finish_job(%s, %s, %s, %s, %s, %s, %s);

-- name: prune_instances
-- Drop instances not seen for a while from the registry; their ids.
select pgleader.prune_instances(%s, %s, make_interval(secs => %s));

-- `pgleader doctor` (pgleader/doctor.py) -----------------------------------------

-- name: doctor_take_lock
-- A session advisory lock of the doctor's own (two int4 keys: never an election's
-- bigint key), and the backend that took it.
select pg_backend_pid() as pid, pg_try_advisory_lock(%(k1)s::int4, %(k2)s::int4) as locked;

-- name: doctor_backend_pid
-- The backend serving this connection now (a pooler may change it between statements).
select pg_backend_pid();

-- name: doctor_lock_seen
-- From a second connection: its own backend, and whether the doctor's lock is granted
-- to the first connection's backend.
select pg_backend_pid() as pid,
       exists (select 1 from pg_locks
                where locktype = 'advisory' and granted and pid = %(holder)s
                  and classid::int8 = %(k1)s and objid::int8 = %(k2)s and objsubid = 2) as seen;

-- name: doctor_release_lock
-- False when this session does not hold the lock (a pooler ran the statement elsewhere).
select pg_advisory_unlock(%(k1)s::int4, %(k2)s::int4);

-- name: doctor_server
-- The server's version, role and the settings the promises depend on, as this
-- session sees them (a role or database may override the server's defaults).
select current_setting('server_version_num')::int as version_num,
       current_setting('server_version') as version,
       pg_is_in_recovery() as in_recovery,
       current_setting('synchronous_commit') as synchronous_commit,
       current_setting('synchronous_standby_names') as synchronous_standby_names,
       current_setting('track_commit_timestamp') as track_commit_timestamp;

-- name: doctor_standbys
-- The standbys streaming from this server (state and sync_state are null for a role
-- without pg_monitor or pg_read_all_stats).
select application_name, state, sync_state
  from pg_stat_replication
 order by application_name;
