-- bench/ceiling: see sbpg_bench_ceiling.c.
CREATE PROCEDURE public.sbpg_bench_ceiling(n integer, batch integer, handler regprocedure, run_as regrole,
                                           subscription text, channel text)
LANGUAGE c AS 'MODULE_PATHNAME', 'sbpg_bench_ceiling';
COMMENT ON PROCEDURE public.sbpg_bench_ceiling(integer, integer, regprocedure, regrole, text, text) IS
	'bench only: per message what sbpg does in the database (the handler with an sbpg.message as run_as, an inbox row, a NOTIFY), a COMMIT every batch';
