-- Room on every page for updates in place.
--
-- Every batch adds to the rows of the minutes it saw (rollup_minute,
-- address_minute) and rewrites the budget ledger of the users it counted
-- (budget_periods): the same rows are updated many times while their
-- minute or day is open. With full pages (fillfactor 100, the default)
-- each update writes its new row version on another page and a new entry
-- in every index of the table; with free room on the row's own page, and
-- no indexed column changed, Postgres updates it as a heap-only tuple
-- (HOT): no index entry, and the old version is pruned from the page
-- without a vacuum. Applies to pages written from now on; `VACUUM FULL`
-- rewrites older ones. docs/performance.md has the measurement.
ALTER TABLE rollup_minute SET (fillfactor = 70);
ALTER TABLE address_minute SET (fillfactor = 70);
ALTER TABLE budget_periods SET (fillfactor = 70);
