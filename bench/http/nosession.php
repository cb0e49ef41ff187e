<?php
// The ceiling: the same request and answer as counter.php, no session.
$count = 1;
echo 'count=', $count, "\n";
