-- pgleader 003: switchover to a named instance, and who may lead.
--
-- A switchover (pgleader transfer, Elector.transfer) names the only instance that
-- may take the lock next, until a bound: then anyone may again, so a target that
-- died never leaves the election leaderless. An instance's eligibility (false:
-- it never campaigns, e.g. one without the broker's registered address) and its
-- priority (higher wins a failover when it is alive) are registered when it joins.
-- The functions that read and write them are in ../functions.sql.

alter table pgleader.election
    add column if not exists transfer_to    text,
    add column if not exists transfer_until timestamptz;
comment on column pgleader.election.transfer_to is
    'A switchover in force names the only instance that may take the lock until transfer_until.';

alter table pgleader.instances
    add column if not exists eligible boolean not null default true,
    add column if not exists priority integer not null default 0;
comment on column pgleader.instances.eligible is
    'false: the instance accepts work but never campaigns (started with --no-lead).';
comment on column pgleader.instances.priority is
    'Higher wins a failover: a lower one holds back briefly while a higher one is alive.';
