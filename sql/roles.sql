-- pgleader: an optional least-privilege role for the gateway instances.
--
-- Not a migration (no NNN_ prefix, never applied by `pgleader migrate`): an operator
-- runs it with psql, as the role that owns the schemas (the one that runs the
-- migrations), in the gateway's database, after the migrations and again after
-- every new one. It is idempotent and converges the role's privileges to exactly
-- the ones below, in one transaction, so running instances never see a gap:
--
--   pgleader migrate --dsn 'host=db dbname=trading user=owner'
--   psql 'host=db dbname=trading user=owner' -v gateway_password='...' -f sql/roles.sql
--
-- then run every instance as that role, leaving the schema alone:
--
--   PGLEADER_DSN='host=db dbname=trading user=pgleader_gateway password=...' \
--     pgleader serve --no-migrate
--
-- Variables: gateway_role (default pgleader_gateway); gateway_password (optional:
-- without it an existing password is kept, a new role gets none, e.g. for
-- certificate or peer authentication). The password travels in an ALTER ROLE
-- statement: where log_statement is 'ddl' or 'all' it reaches the server log, so
-- there pass a SCRAM verifier instead of the plain password (PostgreSQL stores a
-- 'SCRAM-SHA-256$...' value as given), or set it with psql's \password.
--
-- What the role may do: read every table and view of both schemas; insert new
-- signals into the inbox (the webhook) and order requests into the paper broker's
-- book (which stands for the outside world); change everything else only through
-- the functions: those that write are SECURITY DEFINER (sql/pgleader/functions.sql,
-- sql/gateway/functions.sql), run with the owner's rights and check for themselves
-- that the caller holds the lock or the current epoch; LISTEN and NOTIFY
-- (PostgreSQL needs no privilege for either); take advisory locks (public); and
-- terminate a hung leader's session: pg_terminate_backend is allowed on backends
-- of one's own role, so all instances must log in as this same role, and
-- pg_signal_backend (which could signal every non-superuser session) is not granted.
-- What it may not: update any row directly (not the election's epoch, not a
-- signal's status, not an order or a position), delete any row, drop, truncate,
-- alter or own any table, create objects, or touch pgleader.schema_migrations
-- beyond reading it.

\set ON_ERROR_STOP on
\if :{?gateway_role}
\else
\set gateway_role pgleader_gateway
\endif

begin;

-- psql variables do not reach into a DO block; a custom setting does.
select set_config('pgleader.gateway_role', :'gateway_role', true) as gateway_role_set \gset

do $$
declare
    r text := current_setting('pgleader.gateway_role');
    owner_role text;
begin
    if not exists (select from pg_roles where rolname = r) then
        execute format('create role %I login', r);  -- roles are cluster-wide: once
    end if;
    if exists (select from pg_roles where rolname = r and (rolsuper or rolbypassrls)) then
        raise exception 'role % is a superuser or bypasses row security: not least privilege', r;
    end if;
    -- Owning a table, or inheriting from its owner, would allow DROP and TRUNCATE.
    for owner_role in
        select distinct pg_get_userbyid(c.relowner)
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname in ('pgleader', 'gateway')
    loop
        if pg_has_role(r, owner_role, 'USAGE') then
            raise exception 'role % owns (or inherits from %, the owner of) the pgleader tables: '
                'run the migrations as another role', r, owner_role;
        end if;
    end loop;
end
$$;

alter role :"gateway_role" login;
\if :{?gateway_password}
alter role :"gateway_role" password :'gateway_password';
\endif

-- Start from nothing, so that privileges granted by an older version of this file go.
revoke all on all tables in schema pgleader, gateway from :"gateway_role";
revoke all on all sequences in schema pgleader, gateway from :"gateway_role";
revoke all on all functions in schema pgleader, gateway from :"gateway_role";
revoke all on schema pgleader, gateway from :"gateway_role";

grant connect on database :"DBNAME" to :"gateway_role";
grant usage on schema pgleader, gateway to :"gateway_role";

-- Reading: the election, the history, the inbox, the views;
-- pgleader.schema_migrations for /ready (is anything missing?).
grant select on all tables in schema pgleader, gateway to :"gateway_role";

-- Writing directly: only what comes from outside. Identity columns need no
-- sequence privilege.
grant insert on gateway.signals, gateway.paper_broker_requests to :"gateway_role";

-- Every other change: the functions. Those marked SECURITY DEFINER write with the
-- owner's rights; the others run with the role's, which lets them write nothing.
grant execute on all functions in schema pgleader, gateway to :"gateway_role";

commit;
