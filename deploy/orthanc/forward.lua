-- Orthanc -> triaged auto-routing (Orthanc 1.10 or newer, built-in Lua engine).
--
-- When a study has been stable for "StableAge" seconds, every CT series of it that was not
-- sent yet goes to the DICOM modality named "triaged" (see orthanc.json). A series counts
-- as CT by the SOP Class of its instances (CT or Enhanced CT Image Storage), so triaged's
-- own results (SR, Secondary Capture, SEG), which come back into the same study and make
-- it stable again, are never sent back. A sent series is marked with the user metadata
-- "TriagedForwarded" (the job id), so a study that grows later sends only its new series.
--
-- A forward that fails (triaged down, network) stays a failed job in Orthanc (GET /jobs).
-- OnHeartBeat (Orthanc >= 1.11 with "LuaHeartBeatPeriod") resubmits those jobs; on
-- Orthanc 1.10 run it from cron: POST /tools/execute-script with body "OnHeartBeat()"
-- (needs "ExecuteLuaEnabled"), or resubmit one job: POST /jobs/{id}/resubmit.

local TARGET = 'triaged'           -- key of triaged in "DicomModalities"
local MARK = 'TriagedForwarded'    -- name declared in "UserMetadata"
local CT_SOP_CLASSES = {
   ['1.2.840.10008.5.1.4.1.1.2'] = true,    -- CT Image Storage
   ['1.2.840.10008.5.1.4.1.1.2.1'] = true,  -- Enhanced CT Image Storage
}

local function Get(uri)
   return ParseJson(RestApiGet(uri))
end

local function IsForwarded(seriesId)
   for _, name in ipairs(Get('/series/' .. seriesId .. '/metadata')) do
      if name == MARK then
         return true
      end
   end
   return false
end

local function IsCT(series)
   local first = series['Instances'][1]
   if first == nil then
      return false
   end
   local sopClass = RestApiGet('/instances/' .. first .. '/metadata/SopClassUid')
   return CT_SOP_CLASSES[sopClass] == true
end

local function SeriesToForward(studyId)
   local ids = {}
   for _, series in ipairs(Get('/studies/' .. studyId .. '/series')) do
      if IsCT(series) and not IsForwarded(series['ID']) then
         table.insert(ids, series['ID'])
      end
   end
   return ids
end

function OnStableStudy(studyId, tags, metadata)
   local ids = SeriesToForward(studyId)
   if #ids == 0 then
      return
   end
   local request = { Resources = ids, Synchronous = false }
   local job = ParseJson(RestApiPost('/modalities/' .. TARGET .. '/store', DumpJson(request, true)))
   for _, id in ipairs(ids) do
      RestApiPut('/series/' .. id .. '/metadata/' .. MARK, job['ID'])
   end
   print('triaged: study ' .. (tags['StudyInstanceUID'] or studyId) .. ': ' .. #ids ..
         ' CT series queued to ' .. TARGET .. ' (job ' .. job['ID'] .. ')')
end

local function IsFailedForward(job, aet)
   return job['State'] == 'Failure' and job['Type'] == 'DicomModalityStore'
      and job['Content'] ~= nil and job['Content']['RemoteAet'] == aet
end

function OnHeartBeat()
   local aet = Get('/modalities/' .. TARGET .. '/configuration')['AET']
   for _, job in ipairs(Get('/jobs?expand')) do
      if IsFailedForward(job, aet) then
         print('triaged: resubmitting failed forward job ' .. job['ID'])
         RestApiPost('/jobs/' .. job['ID'] .. '/resubmit', '')
      end
   end
end

function OnJobFailure(jobId)
   print('triaged: job ' .. jobId .. ' failed; OnHeartBeat resubmits failed forwards')
end
